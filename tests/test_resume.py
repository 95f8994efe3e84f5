"""Checkpoints and resuming: a killed run continues and ends as if it had never stopped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from melanoma.checkpoint import CheckpointError, load_state, save_atomically
from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.config import TrainConfig
from melanoma.train import fit

ROOT = Path(__file__).resolve().parents[1]
# Five epochs of the CNN on demo data, one thread: long enough epochs to kill one mid-way.
ARGS = ["--model", "cnn", "--data", "demo", "--demo_size", "120", "--img_size", "128", "--epochs", "5",
        "--patience", "5", "--batch_size", "16", "--num_threads", "1", "--bootstrap", "50", "--gradcam_images", "0",
        "--seed", "3"]
TIMINGS = ("train_images_per_s", "epoch_seconds")


class Stop(Exception):
    pass


def tiny_fit(cfg: TrainConfig, images, labels, **kwargs):
    torch.manual_seed(0)
    model = build_model("cnn", 3)
    return model, fit(model, images[:48], labels[:48], images[48:], labels[48:], PreprocessSpec(img_size=16), cfg,
                      torch.device("cpu"), **kwargs)


def test_fit_resumed_from_a_checkpoint_repeats_the_uninterrupted_run_exactly(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (64, 3, 16, 16), dtype=np.uint8), np.arange(64) % 2
    cfg = TrainConfig(model="cnn", epochs=4, batch_size=8, patience=4, ema=0.9, num_threads=1)
    whole_model, whole = tiny_fit(cfg, images, labels)

    states = []

    def stop_in_epoch_3(epoch, metrics):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        tiny_fit(cfg, images, labels, on_checkpoint=lambda s: save_atomically(s, tmp_path / "last.pt"),
                 on_epoch_end=stop_in_epoch_3)
    states.append(load_state(tmp_path / "last.pt"))
    assert states[0]["epoch"] == 2
    resumed_model, resumed = tiny_fit(cfg, images, labels, resume=states[0])

    strip = [{k: v for k, v in h.items() if k not in TIMINGS} for h in whole.history]
    assert [{k: v for k, v in h.items() if k not in TIMINGS} for h in resumed.history] == strip
    assert (resumed.best_epoch, resumed.best_val_auc) == (whole.best_epoch, whole.best_val_auc)
    for a, b in zip(whole_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_half_written_checkpoint_is_never_the_one_read(tmp_path):
    path = tmp_path / "last.pt"
    save_atomically({"epoch": 1}, path)
    path.with_name("last.pt.partial").write_bytes(b"\x80\x02 cut off")  # a write killed mid-way
    assert load_state(path)["epoch"] == 1
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(path)


def env_for(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env.update(MELANOMA_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    return env


def train(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "melanoma.cli", "train", *ARGS, *extra], env=env_for(tmp_path),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def fetch_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def epochs_logged(client: MlflowClient, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "val_auc")), default=0)


def wait_for_epoch(client: MlflowClient, process: subprocess.Popen, epoch: int, timeout: float = 300) -> tuple[str, float]:
    """Poll the store until the process's run has logged ``epoch``; returns (run id, time)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        runs = [r for r in fetch_runs(client) if r.info.status == "RUNNING"]
        if runs and epochs_logged(client, runs[0].info.run_id) >= epoch:
            return runs[0].info.run_id, time.time()
        time.sleep(0.02)
    raise TimeoutError(f"epoch {epoch} not logged within {timeout} s")


def comparable(client: MlflowClient, run_id: str) -> dict:
    metrics = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k not in TIMINGS}
    history = {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
               for k in ("val_auc", "train_loss", "val_loss", "train_accuracy", "lr")}
    return {"final": metrics, "history": history}


@pytest.mark.e2e
def test_a_run_killed_in_epoch_3_resumes_through_mlflow_run_to_the_uninterrupted_result(tmp_path):
    client = MlflowClient()
    whole = train(tmp_path)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    (whole_run,) = fetch_runs(client)
    client.set_experiment_tag(whole_run.info.experiment_id, "role", "uninterrupted")
    client.rename_experiment(whole_run.info.experiment_id, "uninterrupted")

    killed = train(tmp_path, "--experiment", "killed")
    run_id, t1 = wait_for_epoch(client, killed, 1)
    _, t2 = wait_for_epoch(client, killed, 2)
    time.sleep(random.Random().uniform(0.1, 0.6) * (t2 - t1))  # a random step of epoch 3
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert epochs_logged(client, run_id) == 2, "the kill came after epoch 3 ended; epochs must be longer"
    assert client.get_run(run_id).info.status == "RUNNING"  # a lost machine says nothing

    subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-P",
                    f"resume={run_id}"], check=True, env=env_for(tmp_path), cwd=tmp_path, timeout=600)
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_auc")] == [1, 2, 3, 4, 5]
    assert comparable(client, run_id) == comparable(client, whole_run.info.run_id)
    (stub,) = [r for r in fetch_runs(client) if r.info.run_id not in (run_id, whole_run.info.run_id)]
    assert stub.data.tags["resumed_run"] == run_id  # `mlflow run`'s own run points to the resumed one


@pytest.mark.e2e
def test_ctrl_c_ends_the_run_killed_with_its_checkpoint_and_it_can_be_resumed(tmp_path):
    client = MlflowClient()
    process = train(tmp_path)
    run_id, _ = wait_for_epoch(client, process, 1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    assert "--resume" in process.stderr.read()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/last.pt"]
    assert "model" not in {a.path for a in client.list_artifacts(run_id)}  # no half-trained model logged

    resumed = train(tmp_path, "--resume", run_id)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not Path(client.get_run(run_id).data.tags["checkpoint_path"]).exists()  # the local copy is cleaned up
    failed = subprocess.run([sys.executable, "-m", "melanoma.cli", "train", "--resume", run_id], env=env_for(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "has finished; there is nothing to resume" in failed.stderr
