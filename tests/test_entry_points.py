"""Every MLproject entry point through `mlflow run` on tiny generated data: the run finishes with
its outputs, and the params it logged itself agree with those `mlflow run` logged first.

`main` and `search` run in tests/test_end_to_end.py; this file runs the others."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from melanoma.classifier.logged import load_logged_model
from melanoma.config import TrainConfig
from melanoma.data.demo import make_demo_dataset
from melanoma.workflows.training import run_training

from .test_end_to_end import ROOT, mlflow_run

pytestmark = pytest.mark.e2e
TINY = dict(model="cnn", epochs=1, img_size=32, batch_size=16, bootstrap=50, gradcam_images=2)


def entry_points() -> set[str]:
    return set(yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"])


def runs_of(experiment: str) -> list:
    client = MlflowClient()
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_every_entry_point_has_an_mlflow_run_test():
    tested = {"main", "search"} | {"quality", "crossval", "ensemble", "adapt"}  # test_end_to_end.py, and this file
    assert entry_points() == tested


def test_mlflow_run_quality_trains_the_quality_recipe(tmp_path):
    data = make_demo_dataset(tmp_path / "clinic", per_class=12, seed=1, size=48)
    mlflow_run(tmp_path, "quality", {"data": str(data), "epochs": 1, "bootstrap": 50, "gradcam_images": 1})
    (run,) = runs_of("e2e")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model"], params["img_size"], params["tta"]) == ("efficientnet_lite2", "160", "flip")
    assert params["epochs"] == "1" and params["balance"] == "class"  # main's parameters, still settable
    served = load_logged_model(f"runs:/{run.info.run_id}/model")
    assert served.spec.img_size == 160 and served.tta == "flip"


def test_mlflow_run_crossval_holds_out_each_source_and_trains_the_final_model(tmp_path):
    a = make_demo_dataset(tmp_path / "a", per_class=12, seed=1, size=48)
    b = make_demo_dataset(tmp_path / "b", per_class=12, seed=2, size=48)
    mlflow_run(tmp_path, "crossval", {**TINY, "data": f"clinic_a:{a},clinic_b:{b}", "final": "true"})
    found = runs_of("e2e")
    assert len(found) == 4 and all(r.info.status == "FINISHED" for r in found)
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    runs = {r.info.run_name: r for r in found if r is not parent}
    assert set(runs) == {"heldout-clinic_a", "heldout-clinic_b", "all-sources"}
    assert parent.data.params["final"] == "true" and parent.data.params["holdout_source"] == "''"
    for metric in ("heldout_clinic_a_auc", "heldout_clinic_b_auc", "crossval_worst_auc", "travel_sensitivity"):
        assert metric in parent.data.metrics, metric
    final = runs["all-sources"]
    assert final.data.tags["threshold_rule"] == "crossval"
    card = mlflow.artifacts.load_text(f"runs:/{final.info.run_id}/model_card.md")
    assert "Rule: the threshold that travels" in card and "| clinic_a |" in card and "| clinic_b |" in card


def test_mlflow_run_ensemble_then_adapt_the_registered_ensemble(tmp_path, demo_root):
    ids = []
    for seed in (1, 2):
        cfg = TrainConfig(data=str(demo_root), seed=seed, split_seed=0, **TINY)
        with mlflow.start_run() as run:
            run_training(cfg)
        ids.append(run.info.run_id)
    mlflow_run(tmp_path, "ensemble", {"runs": ",".join(ids), "alias": "champion", "bootstrap": 50})
    (ensemble,) = [r for r in runs_of("e2e")]
    assert ensemble.info.status == "FINISHED"
    params = ensemble.data.params
    assert params["tta"] == "''" and params["resolved_tta"] == "none"  # as given, and what it resolved to
    assert params["seed"] == "1,2" and params["model"] == "cnn+cnn"

    site = make_demo_dataset(tmp_path / "site", per_class=20, seed=9, size=64)
    mlflow_run(tmp_path, "adapt", {"model": "models:/melanoma-classifier@champion", "site": "clinic-a",
                                   "data": str(site), "min_melanomas": 5, "bootstrap": 50})
    adapted = [r for r in runs_of("e2e") if r.data.tags.get("adaptation") == "true"]
    assert len(adapted) == 1 and adapted[0].info.status == "FINISHED"
    assert adapted[0].data.params["force_threshold"] == "false" and adapted[0].data.params["unlabelled"] == "''"
    assert adapted[0].data.tags["threshold_rule"] == "site"
    version = MlflowClient().get_model_version_by_alias("melanoma-classifier", "site-clinic-a")
    assert "## Site clinic-a" in version.description
