"""Training checkpoints: the whole training state after every epoch, so a killed run continues.

Each epoch's state (``train.fit`` builds it: weights, optimiser, scheduler, scaler, RNG states,
early-stopping state, history) is written atomically to a local file the run records in its tag
``checkpoint_path``, then copied to the run's artifacts as ``checkpoint/last.pt`` (for a lost
machine). ``melanoma train --resume RUN_ID`` finds it again: the local file when this machine has
it, else the artifact.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import mlflow
import torch

from melanoma.config import TrainConfig, parse_params, settings_params
from melanoma.data.dataset import cache_dir

log = logging.getLogger(__name__)

ARTIFACT_DIR = "checkpoint"
FILE_NAME = "last.pt"
PATH_TAG = "checkpoint_path"


class CheckpointError(ValueError):
    """No usable checkpoint for the run asked to resume."""


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill mid-write leaves
    the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise several types
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc


class RunCheckpoints:
    """The active run's checkpoints: ``fit``'s ``on_checkpoint`` callback."""

    def __init__(self, cfg: TrainConfig, upload: bool = True):
        self.run_id = mlflow.active_run().info.run_id
        self.config = settings_params(cfg)
        self.path = cache_dir() / "checkpoints" / self.run_id / FILE_NAME
        self.upload = upload
        mlflow.set_tag(PATH_TAG, str(self.path))

    def __call__(self, state: dict) -> None:
        save_atomically({**state, "config": self.config}, self.path)
        if self.upload:
            mlflow.log_artifact(str(self.path), ARTIFACT_DIR)
        log.debug("checkpoint after epoch %d: %s", state["epoch"], self.path)

    def remove_local(self) -> None:
        """The local copy is only for resuming: gone once the run has finished."""
        self.path.unlink(missing_ok=True)
        if self.path.parent.exists() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def load_run_checkpoint(run_id: str) -> dict:
    """The last checkpoint of ``run_id``, with its ``config``; CheckpointError says why not."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        raise CheckpointError(f"run {run_id} has finished; there is nothing to resume")
    local = run.data.tags.get(PATH_TAG)
    if local and Path(local).is_file():
        return load_state(Path(local))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{FILE_NAME}", tmp)
        except Exception as exc:
            raise CheckpointError(f"run {run_id} has no checkpoint (no {local or 'local file'}, no artifact "
                                  f"{ARTIFACT_DIR}/{FILE_NAME}): it stopped before its first epoch ended, or was "
                                  f"trained without checkpoints") from exc
        return load_state(Path(path))


def config_of(state: dict) -> TrainConfig:
    """The settings a checkpoint's run trained with (read as a run's params are)."""
    return parse_params(state["config"])
