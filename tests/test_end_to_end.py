"""End to end on tiny demo data: `mlflow run` of each entry point, the registry and `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from melanoma.classifier.errors import SettingsError
from melanoma.classifier.logged import load_logged_model
from melanoma.config import SearchSettings, TrainConfig
from melanoma.servers import model_server, ping
from melanoma.workflows import search

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="cnn", epochs=2, img_size=32, demo_size=16, gradcam_images=4, batch_size=16, bootstrap=100)
pytestmark = pytest.mark.e2e


def mlflow_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env.update(MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"], MELANOMA_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    return env


def mlflow_run(tmp_path: Path, entry_point: str, params: dict) -> None:
    args = [arg for k, v in params.items() for arg in ("-P", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local",
                    "--experiment-name", "e2e", *args], check=True, env=mlflow_env(tmp_path), cwd=tmp_path,
                   timeout=600)


def test_mlflow_run_trains_and_logs_everything(tmp_path):
    model = TINY["model"]
    mlflow_run(tmp_path, "main", TINY)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model"] == model and p["epochs"] == "2" and p["img_size"] == "32" and p["data"] == "demo"
    for key in ("batch_size", "lr", "channels", "seed", "data_digest", "data_train_benign", "data_val_malignant",
                "data_test_count"):
        assert key in p
    assert run.data.tags["synthetic_data"] == "true"
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_sensitivity",
                   "val_specificity", "lr", "train_images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    for metric in ("test_accuracy", "test_balanced_accuracy", "test_auc", "test_sensitivity", "test_specificity",
                   "test_f1", "test_op_specificity", "threshold"):
        assert metric in run.data.metrics, metric
    artifacts = [a.path for folder in ("evaluation", "gradcam") for a in client.list_artifacts(run.info.run_id, folder)]
    assert any("confusion" in a for a in artifacts) and any("roc" in a for a in artifacts)
    assert any("gradcam" in a and a.endswith(".png") for a in artifacts)

    model_uri = run.data.tags["model_uri"]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images = sorted((tmp_path / "cache").rglob("test/*/*.jpg"))[:3]
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    out = pyfunc.predict(frame)
    assert len(out) == 3 and out.malignant_probability.between(0, 1).all()
    assert_loads_without_the_project(model_uri, images[0], tmp_path)


HIDE_PROJECT = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                 and "editable" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", {root!r}) and "__editable__" not in p]
try:
    import melanoma
    raise SystemExit("the project is still importable")
except ImportError:
    pass
import base64, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({model_dir!r})
out = model.predict(pd.DataFrame({{"image": [base64.b64encode(open({image!r}, "rb").read()).decode()]}}))
import melanoma
assert melanoma.__file__.startswith({model_dir!r}), melanoma.__file__
print(out.malignant_probability[0])
"""


def assert_loads_without_the_project(model_uri: str, image: Path, tmp_path: Path) -> None:
    """The logged model loads and predicts in a Python where melanoma is not importable."""
    model_dir = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model"))
    script = HIDE_PROJECT.format(root=str(ROOT), model_dir=model_dir, image=str(image))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0 <= float(result.stdout.strip().splitlines()[-1]) <= 1


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows(*values: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def test_mlflow_run_search_registers_the_best_trial_and_the_server_answers_real_images(tmp_path):
    base = TrainConfig(**TINY)
    search_params = {k: v for k, v in TINY.items() if k != "bootstrap"}  # not a search parameter
    mlflow_run(tmp_path, "search", {**search_params, "n_trials": 2, "storage": f"sqlite:///{tmp_path / 'optuna.db'}"})

    client = MlflowClient()
    version = client.get_model_version_by_alias("melanoma-classifier", "champion")
    assert version.tags["study"] == f"melanoma-{base.model}" and version.tags["metric"] == "val_auc"
    best = client.get_run(version.tags["run"])
    parent = client.get_run(best.data.tags["mlflow.parentRunId"])
    assert float(version.tags["value"]) == pytest.approx(parent.data.metrics["best_val_auc"])
    assert best.data.metrics["best_val_auc"] == pytest.approx(parent.data.metrics["best_val_auc"])
    assert parent.data.metrics["trials_complete"] == 2
    assert parent.data.tags["optuna_study"] == f"melanoma-{base.model}" and "best_lr" in parent.data.metrics
    assert {"search/optimization_history.png", "search/param_importances.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert all({"lr", "batch_size", "model", "img_size"} <= set(c.data.params) for c in children)
    assert all(len(client.get_metric_history(c.info.run_id, "val_auc")) == 2 for c in children)

    with model_server("models:/melanoma-classifier@champion", mlflow_env(tmp_path)) as (url, _):
        image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
        jpeg = base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()
        png = base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()
        status, body = post(url, rows(jpeg, png))
        assert status == 200
        for row in body["predictions"]:  # noise: scored, and no dermoscopy photo
            assert 0 <= row["malignant_probability"] <= 1
            assert row["malignant_probability"] + row["benign_probability"] == pytest.approx(1)
            assert row["scope_check"] == "out of scope" and row["in_scope"] is False and row["label"] == "out of scope"
        status, body = post(url, {**rows(jpeg, png), "params": {"label_out_of_scope": True}})
        threshold = load_logged_model("models:/melanoma-classifier@champion").threshold
        for row in body["predictions"]:  # the class label all the same, when the request asks for it
            assert row["label"] == ("malignant" if row["malignant_probability"] >= threshold else "benign")

        status, body = post(url, {**rows(jpeg), "params": {"explain": True}})
        overlay = base64.b64decode(body["predictions"][0]["gradcam_png"])
        assert status == 200 and overlay.startswith(b"\x89PNG")
        assert cv2.imdecode(np.frombuffer(overlay, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)

        for payload, message in [(rows(jpeg, "not*base64"), "row 1: not valid base64"),
                                 (rows(base64.b64encode(b"text").decode()), "row 0: not a recognised image"),
                                 ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty"),
                                 ({"dataframe_split": {"columns": ["photo"], "data": [[jpeg]]}}, "image")]:
            status, body = post(url, payload)
            assert status == 400 and message in body["message"], body
        assert ping(url)
        assert post(url, rows(jpeg))[0] == 200


class PruneAllButTheFirstTrial(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number > 0


def test_pruned_trials_end_killed_and_an_interrupted_search_resumes(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = TrainConfig(**{**TINY, "epochs": 1})
    search.run_search(base, SearchSettings(n_trials=1, storage=storage, study_name="resume"))

    # A crash mid-trial leaves the trial RUNNING in the storage.
    study = optuna.load_study(study_name="resume", storage=storage)
    study.ask()
    summary = search.run_search(base, SearchSettings(n_trials=2, storage=storage, study_name="resume"))
    study = optuna.load_study(study_name="resume", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1 and "RUNNING" not in states
    assert summary["complete"] == 2
    assert search.run_search(base, SearchSettings(n_trials=2, storage=storage, study_name="resume"))["complete"] == 2

    # The study's base settings are its own: resuming it with others is refused, naming them.
    with pytest.raises(SettingsError, match=r"study 'resume' was searched with other settings \(epochs: logged '1', now '2'\)"):
        search.run_search(TrainConfig(**TINY), SearchSettings(n_trials=3, storage=storage, study_name="resume"))

    monkeypatch.setattr(search, "make_pruner", lambda name: PruneAllButTheFirstTrial())
    summary = search.run_search(TrainConfig(**TINY), SearchSettings(n_trials=2, storage=storage, study_name="prune"))
    assert summary["pruned"] == 1
    client = MlflowClient()
    pruned = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.pruned = 'true'")
    assert len(pruned) == 1 and pruned[0].info.status == "KILLED"
