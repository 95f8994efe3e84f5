"""External evaluation through the logged pyfunc, and external sets inside a training run."""

import shutil

import pytest
from mlflow.tracking import MlflowClient

from melanoma.cli import main
from melanoma.evaluate import external_names


@pytest.fixture
def trained(trained_runs, monkeypatch):
    """The shared CNN run (it scored the demo test/benign folder as an external set)."""
    trained_runs.activate(monkeypatch)
    run = MlflowClient().get_run(trained_runs.cnn)
    return run.info.run_id, {"model_uri": run.data.tags["model_uri"], "threshold": run.data.metrics["threshold"]}


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
    (evaluation,) = client.search_runs([client.get_experiment_by_name("melanoma-evaluation").experiment_id],
                                       "params.name = 'nevi'")
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
    name = demo_root.name
    (evaluation,) = client.search_runs([client.get_experiment_by_name("melanoma-evaluation").experiment_id],
                                       f"params.name = '{name}'")
    assert evaluation.data.metrics[f"{name}_count"] == 8  # the test/ split only
    assert f"{name}_auc" in evaluation.data.metrics


def test_external_folders_with_the_same_name_are_told_apart(tmp_path):
    a, b = tmp_path / "a" / "test", tmp_path / "b" / "test"
    assert external_names([str(a), str(b), str(tmp_path / "nevi")]) == {
        "a_test": str(a), "b_test": str(b), "nevi": str(tmp_path / "nevi")}
    with pytest.raises(ValueError, match="both be reported as"):
        external_names([str(tmp_path / "nevi"), str(tmp_path / "nevi")])
