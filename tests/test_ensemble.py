"""Ensembles: the research check (experiments/ensemble.py: logged runs re-scored and combined)
and the ensemble model (melanoma ensemble: logged, registered, loaded and served)."""

import base64
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import ensemble
from melanoma.classifier.errors import SettingsError
from melanoma.cli import main
from melanoma.config import REGISTERED_MODEL, EnsembleSettings, TrainConfig
from melanoma.data.training_data import load_data
from melanoma.workflows.ensemble import run_ensemble


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
    with pytest.raises(ValueError, match="cannot form an ensemble"):
        ensemble.main([trained_runs.cnn, trained_runs.other_split, "--external", str(demo_root / "test" / "benign")])


# The ensemble as a model (melanoma.workflows.ensemble): logged, registered, loaded and served.

def jpeg_base64(demo_root) -> str:
    path = next((demo_root / "test" / "malignant").glob("*.jpg"))
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_an_ensemble_logs_registers_loads_and_serves_the_averaged_logits(trained_runs, demo_root, monkeypatch):
    trained_runs.activate(monkeypatch)
    members = [trained_runs.cnn, trained_runs.second]
    with mlflow.start_run() as run:
        summary = run_ensemble(EnsembleSettings(runs=",".join(members), bootstrap=50, alias="champion"))
    assert summary["members"] == members and summary["model"] == "cnn+cnn"
    client = MlflowClient()
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert version.run_id == run.info.run_id and "An ensemble" in version.description

    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    classifier = served.unwrap_python_model()
    assert classifier.model.settings["members"] == ["cnn", "cnn"] and len(classifier.model.members) == 2
    assert classifier.model.engine.name == "onnxruntime"  # one graph for both members
    frame = pd.DataFrame({"image": [jpeg_base64(demo_root)]})
    out = served.predict(frame, params={"explain": True})
    assert set(out.columns) >= {"malignant_probability", "label", "gradcam_png"}

    images, _ = classifier.model.images_from_files([base64.b64decode(frame["image"][0])])
    member_logits = [mlflow.pyfunc.load_model(f"runs:/{m}/model").unwrap_python_model().model.engine.logits(images)
                     for m in members]
    expected = classifier.model.calibration.probabilities(torch.stack(member_logits).mean(0))
    assert out["malignant_probability"][0] == pytest.approx(float(expected[0]), abs=1e-4)
    logged = client.get_run(run.info.run_id)
    assert logged.data.params["lr"] == "0.001,0.003" and logged.data.tags["ensemble_runs"] == ",".join(members)
    assert logged.data.metrics["threshold"] == pytest.approx(classifier.model.threshold)


def test_members_validated_on_other_images_are_refused_with_the_reason(trained_runs, monkeypatch):
    trained_runs.activate(monkeypatch)
    with mlflow.start_run(), pytest.raises(SettingsError, match="validation split seed 42 vs 7"):
        run_ensemble(EnsembleSettings(runs=f"{trained_runs.cnn},{trained_runs.other_split}", bootstrap=0))


@pytest.mark.parametrize("flags, message", [(["--runs", "abc"], "at least two training runs"),
                                           (["--runs", "abc,abc"], "names a run twice"),
                                           (["--runs", "a,b", "--tta", "rotate"], "tta must be one of")])
def test_the_cli_names_a_bad_ensemble_in_one_line(flags, message, capsys):
    assert main(["ensemble", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_fixed_split_seed_gives_seeds_the_same_validation_images(demo_root):
    def val_idx(**settings):
        cfg = TrainConfig(data=str(demo_root), img_size=32, **settings)
        return load_data(cfg, cfg.preprocess_spec()).val_idx

    np.testing.assert_array_equal(val_idx(seed=1, split_seed=5), val_idx(seed=2, split_seed=5))
    assert not np.array_equal(val_idx(seed=1), val_idx(seed=2))
