"""Every MLflow call of a training run: params, metrics, figures, the model, the registry."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import melanoma
from melanoma.classifier.calibration import Calibration
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.engine import ONNX_FILE
from melanoma.classifier.errors import SettingsError
from melanoma.classifier.logged import SETTINGS_FILE, WEIGHTS_FILE
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.classifier.scope import SCOPE_FILE, ScopeModel
from melanoma.config import DEFAULT_ALIAS, REGISTERED_MODEL, same_value

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(melanoma.__file__).parent
# The served model's code: the package's __init__ and the classifier sub-package, whole
# (tests/test_serving.py checks that it imports nothing else of the package), and the packages
# it imports.
SERVED_PACKAGE = "classifier"
SERVING_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pillow", "onnxruntime")


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's model-training views


def tag_experiment() -> None:
    """Mark the active run's experiment as model development (MLflow 3's UI otherwise opens a
    GenAI trace dashboard)."""
    run = mlflow.active_run()
    client = MlflowClient()
    for key, value in EXPERIMENT_KIND.items():
        if client.get_experiment(run.info.experiment_id).tags.get(key) != value:
            client.set_experiment_tag(run.info.experiment_id, key, value)


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
    """Log the finite numeric values of ``metrics`` under ``prefix``."""
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v and k != "epoch"}
    mlflow.log_metrics(clean, step=step)


class ParamConflictError(SettingsError):
    """Params a run has already logged with other values; ``conflicts`` names each."""

    def __init__(self, conflicts: str):
        self.conflicts = conflicts
        super().__init__(f"this run already has other values for its params ({conflicts})")


def log_params(params: dict[str, str]) -> None:
    """Log params to the active run. `mlflow run` logs the entry point's parameters first, in
    its own spelling: a param it has already logged is skipped when both spellings mean one
    value, and a real conflict raises naming both (MLflow cannot change a logged value)."""
    existing = check_params(mlflow.active_run().info.run_id, params)
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def check_params(run_id: str, params: dict[str, str]) -> dict[str, str]:
    """The run's logged params; ``ParamConflictError`` if any of ``params`` has another value there."""
    existing = MlflowClient().get_run(run_id).data.params
    conflicts = [f"{k}: logged {existing[k]!r}, now {v!r}" for k, v in params.items()
                 if k in existing and not same_value(existing[k], v)]
    if conflicts:
        raise ParamConflictError("; ".join(conflicts))
    return existing


def log_threshold(threshold: float, rule: ThresholdRule) -> None:
    """The operating threshold and its rule, in the run's record (``ThresholdRule.from_record``
    reads them back from the run's params, metrics and tags merged)."""
    mlflow.log_metrics({"threshold": threshold, "threshold_validation_sensitivity": rule.validation_sensitivity})
    mlflow.set_tag("threshold_rule", rule.name)


def run_record(run) -> dict:
    """A run's params, metrics and tags as one mapping (what ``ThresholdRule.from_record`` reads)."""
    return {**run.data.params, **run.data.metrics, **run.data.tags}


def epoch_logger(epoch: int, metrics: dict[str, float]) -> None:
    """The training loop's callback: per-epoch metrics with step = epoch."""
    log_metrics(metrics, step=epoch)


def log_figure(fig: plt.Figure, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_json(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def _opencv_requirement() -> str:
    for name in ("opencv-python", "opencv-python-headless"):
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "opencv-python-headless"


def pip_requirements(model_names: list[str]) -> list[str]:
    """The served model's requirements, pinned to what trained it (timm only for timm models)."""
    from melanoma.classifier.architectures import architecture

    timm = any(architecture(name).library == "timm" for name in model_names)
    packages = [*SERVING_PACKAGES, *(["timm"] if timm else [])]
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in packages]
    return [f"mlflow=={mlflow.__version__}", _opencv_requirement(), *pins]


def serving_code(folder: Path) -> Path:
    """A copy of the package holding only the serving path, under ``folder``."""
    target = folder / "melanoma"
    shutil.copytree(PACKAGE_DIR / SERVED_PACKAGE, target / SERVED_PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(PACKAGE_DIR / "__init__.py", target / "__init__.py")
    return target


def log_classifier(model: torch.nn.Module, model_name: str | list[str], spec: PreprocessSpec, threshold: float,
                   rule: ThresholdRule, example_image: bytes, calibration: Calibration = Calibration(),
                   onnx_graph: bytes | None = None, extra_settings: dict | None = None,
                   scope: ScopeModel | None = None) -> str:
    """Log the trained network as a self-contained pyfunc (models-from-code, the serving code
    bundled), with its checked ONNX graph where there is one; returns the model URI. An
    ensemble is an ``nn.ModuleList`` with one architecture name per member."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    members = {"members": names} if len(names) > 1 else {}
    settings = {**(extra_settings or {}), "model": "+".join(names), **members, "preprocess": spec.to_dict(),
                "threshold": threshold, **rule.record(), "calibration": calibration.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        weights, settings_file = Path(tmp) / WEIGHTS_FILE, Path(tmp) / SETTINGS_FILE
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
        settings_file.write_text(json.dumps(settings, indent=2))
        artifacts = {"weights": str(weights), "settings": str(settings_file)}
        if onnx_graph is not None:
            (Path(tmp) / ONNX_FILE).write_bytes(onnx_graph)
            artifacts["onnx"] = str(Path(tmp) / ONNX_FILE)
        if scope is not None:
            torch.save(scope.state(), Path(tmp) / SCOPE_FILE)
            artifacts["scope"] = str(Path(tmp) / SCOPE_FILE)
        example = pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]})
        output_example = pd.DataFrame({"malignant_probability": [0.5], "benign_probability": [0.5],
                                       "label": ["benign"], "in_scope": [True], "scope_score": [1.0],
                                       "scope_check": ["in scope"]})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / SERVED_PACKAGE / "pyfunc_model.py"),
            artifacts=artifacts,
            code_paths=[str(serving_code(Path(tmp) / "code"))],
            signature=infer_signature(example, output_example, params={"explain": False, "label_out_of_scope": False}),
            input_example=example,
            pip_requirements=pip_requirements(names),
        )
    return info.model_uri


def register_run_model(run_id: str, name: str = REGISTERED_MODEL, alias: str | None = DEFAULT_ALIAS,
                       tags: dict[str, str] | None = None) -> "mlflow.entities.model_registry.ModelVersion":
    """Register the model logged by ``run_id`` as a new version of ``name`` and point ``alias``
    at it."""
    client = MlflowClient()
    run = client.get_run(run_id)  # a clear MlflowException if the run does not exist
    model_uri = run.data.tags.get("model_uri", f"runs:/{run_id}/model")
    version = mlflow.register_model(model_uri, name, tags={"run_id": run_id, **(tags or {})})
    from melanoma.card import log_card, version_description

    client.update_model_version(name, version.version, description=version_description(log_card(run_id), run_id))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
        log.info("registered %s version %s as @%s", name, version.version, alias)
    return version
