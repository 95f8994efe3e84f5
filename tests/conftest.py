"""Shared fixtures: an isolated MLflow store and cache per test session, tiny demo data."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma.data import make_demo_dataset


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own tracking store, array cache and working directory."""
    import mlflow

    monkeypatch.setenv("MELANOMA_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    # mlflow.set_experiment() in an earlier test leaves its experiment active for the process.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kaggle-layout dataset: 16 train + 4 test images per class, 64 px."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "melanoma_cancer_dataset",
                             per_class=16, seed=1, size=64)
