"""Shared fixtures: an isolated MLflow store and cache per test, tiny demo data, trained runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from melanoma.data.demo import make_demo_dataset


def pytest_configure(config: pytest.Config) -> None:
    """With one pytest-xdist worker per core, each worker's torch takes one thread: more would
    only make the workers' threads compete for the same cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def use_store(monkeypatch: pytest.MonkeyPatch, root: Path) -> str:
    """Point MLflow's tracking store and the array cache at ``root``; returns the tracking URI."""
    import mlflow

    monkeypatch.setenv("MELANOMA_CACHE", str(root / "cache"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    # mlflow.set_experiment() in an earlier test leaves its experiment active for the process.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    return uri


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own tracking store, array cache and working directory."""
    import mlflow

    use_store(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kaggle-layout dataset: 16 train + 4 test images per class, 64 px."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "melanoma_cancer_dataset",
                             per_class=16, seed=1, size=64)


@dataclass
class TrainedRuns:
    """Finished training runs in one tracking store, shared by the tests that only read them."""

    root: Path
    cnn: str  # run ids: the CNN, with demo test/benign as an external set
    second: str  # a second model on the same split (the CNN at another learning rate)
    other_split: str  # the CNN with another seed, so another validation split

    def activate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        use_store(monkeypatch, self.root)


@pytest.fixture(scope="session")
def trained_runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRuns:
    import mlflow

    from melanoma.config import TrainConfig
    from melanoma.workflows.training import run_training

    root = tmp_path_factory.mktemp("trained")
    ids = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_store(monkeypatch, root)
        experiment = mlflow.create_experiment("trained")
        for overrides in ({}, {"lr": 3e-3}, {"seed": 7}):
            cfg = TrainConfig(model="cnn", data=str(demo_root), epochs=1, img_size=32, gradcam_images=2, batch_size=16,
                              bootstrap=200, external=str(demo_root / "test" / "benign"), **overrides)
            with mlflow.start_run(experiment_id=experiment) as run:
                run_training(cfg)
            ids.append(run.info.run_id)
    return TrainedRuns(root, *ids)
