"""External evaluation through the logged pyfunc, and external sets inside a training run."""

import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from melanoma.cli import main
from melanoma.config import TrainConfig
from melanoma.pipeline import run_training


@pytest.fixture
def trained(demo_root, monkeypatch):
    """A tiny training run that also scores the demo test/benign folder as an external set."""
    cfg = TrainConfig(data=str(demo_root), epochs=1, img_size=32, gradcam_images=2, batch_size=16,
                      external=str(demo_root / "test" / "benign"))
    mlflow.set_experiment("external")
    with mlflow.start_run() as run:
        summary = run_training(cfg)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")  # set_experiment exports it; a new CLI process has none
    return run.info.run_id, summary


def test_training_logs_external_metrics_without_using_them_for_selection(trained):
    run_id, summary = trained
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert {"external_benign_specificity", "external_benign_accuracy", "external_benign_count"} <= set(metrics)
    assert "external_benign_auc" not in metrics  # undefined for a single class
    assert metrics["external_benign_count"] == 4
    assert "audit_border_probe_auc" in metrics and "audit_exact_duplicate_pairs" in metrics


def test_evaluate_scores_a_folder_as_a_client_and_logs_a_linked_run(trained, demo_root, tmp_path, capsys):
    run_id, summary = trained
    folder = shutil.copytree(demo_root / "test" / "benign", tmp_path / "nevi" / "benign")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(["evaluate", "--model", summary["model_uri"], "--data", str(folder.parent), "--name", "nevi"]) == 0
    client = MlflowClient()
    (evaluation,) = client.search_runs([client.get_experiment_by_name("melanoma-evaluation").experiment_id])
    assert evaluation.data.tags["source_run_id"] == run_id
    assert evaluation.data.tags["model_uri"] == summary["model_uri"]
    metrics = evaluation.data.metrics
    assert metrics["nevi_count"] == 4 and metrics["nevi_skipped_files"] == 1
    assert 0 <= metrics["nevi_specificity"] <= 1 and "nevi_sensitivity" not in metrics
    assert float(evaluation.data.params["threshold"]) == pytest.approx(summary["threshold"])
    assert '"specificity"' in capsys.readouterr().out


def test_evaluate_with_both_classes_reports_auc(trained, demo_root):
    _, summary = trained
    assert main(["evaluate", "--model", summary["model_uri"], "--data", str(demo_root)]) == 0
    client = MlflowClient()
    (evaluation,) = client.search_runs([client.get_experiment_by_name("melanoma-evaluation").experiment_id])
    name = demo_root.name
    assert evaluation.data.metrics[f"{name}_count"] == 8  # the test/ split only
    assert f"{name}_auc" in evaluation.data.metrics
