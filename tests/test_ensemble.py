"""The ensemble check: logged runs re-scored, combined, thresholds chosen on validation."""

import json

import pytest
from mlflow.tracking import MlflowClient

from experiments import ensemble


def test_one_run_reproduces_its_own_threshold_and_external_figure(trained_runs, demo_root, tmp_path, monkeypatch):
    trained_runs.activate(monkeypatch)
    first, second = trained_runs.cnn, trained_runs.second
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


def test_runs_split_differently_are_refused(trained_runs, demo_root, monkeypatch):
    trained_runs.activate(monkeypatch)
    with pytest.raises(ValueError, match="split differently"):
        ensemble.main([trained_runs.cnn, trained_runs.other_split, "--external", str(demo_root / "test" / "benign")])
