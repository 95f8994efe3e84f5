"""The ensemble check: logged runs re-scored, combined, thresholds chosen on validation."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from experiments import ensemble
from melanoma.config import TrainConfig
from melanoma.pipeline import run_training


def train(demo_root, **overrides) -> str:
    cfg = TrainConfig(data=str(demo_root), epochs=1, img_size=32, gradcam_images=0, batch_size=16,
                      external=str(demo_root / "test" / "benign"), **overrides)
    with mlflow.start_run() as run:
        run_training(cfg)
    return run.info.run_id


def test_one_run_reproduces_its_own_threshold_and_external_figure(demo_root, tmp_path):
    first, second = train(demo_root, model="cnn"), train(demo_root, model="resnet18")
    out = tmp_path / "ensemble.json"
    rows = ensemble.main([first, second, "--external", str(demo_root / "test" / "benign"), "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(len(r["runs"]), r["flips"]) for r in rows] == [(1, False), (1, True), (1, False), (1, True),
                                                             (2, False), (2, True)]
    logged = MlflowClient().get_run(first).data.metrics
    plain = rows[0]
    assert plain["threshold"] == pytest.approx(logged["threshold"])
    assert plain["external_benign_specificity"] == pytest.approx(logged["external_benign_specificity"])
    assert plain["val_auc"] == pytest.approx(logged["best_val_auc"])
    for row in rows:
        assert 0 <= row["external_benign_specificity"] <= 1 and row["val_op_specificity"] <= 1


def test_runs_split_differently_are_refused(demo_root):
    first, other = train(demo_root), train(demo_root, seed=7)
    with pytest.raises(ValueError, match="split differently"):
        ensemble.main([first, other, "--external", str(demo_root / "test" / "benign")])
