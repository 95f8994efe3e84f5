"""Score any labelled folder through a logged model and log it as an evaluation run.

The model is loaded as MLflow serves it (the pyfunc, its stored preprocessing, weights and
threshold); the folder is decoded with that preprocessing through the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np

from melanoma import tracking
from melanoma.evaluate import folder_metrics, score_folder
from melanoma.figures import confusion_figure, roc_figure

log = logging.getLogger(__name__)


def evaluate_model_on_folder(model_uri: str, data: str | Path, name: str | None = None) -> dict:
    """Metrics of ``model_uri`` on ``data`` at the model's own threshold, logged as an evaluation
    run tagged with the model and the run that trained it.

    ``data``: a Kaggle layout (its ``test/`` is scored when there is one, else everything),
    ``benign/`` and/or ``malignant/`` folders, or one folder named after a class.
    """
    classifier = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    prepared, probs = score_folder(classifier.model, data, classifier.spec, classifier.device)
    chosen = prepared.indices("test")
    if not len(chosen):
        chosen = np.arange(len(prepared.labels))
        if len(prepared.indices("train")):
            log.warning("%s has no test/ split; scoring train/ (optimistic if the model trained on it)", data)
    labels, probs = prepared.labels[chosen], probs[chosen]
    name = name or Path(data).resolve().name
    metrics = {**folder_metrics(labels, probs, classifier.threshold), "skipped_files": len(prepared.skipped)}

    with mlflow.start_run(run_name=f"evaluate-{name}"):
        mlflow.set_tags({"evaluation": "external", "model_uri": model_uri,
                         "source_run_id": mlflow.models.get_model_info(model_uri).run_id or ""})
        mlflow.log_params({"model_uri": model_uri, "data": str(Path(data).resolve()), "name": name,
                           "threshold": classifier.threshold})
        tracking.log_metrics(metrics, prefix=f"{name}_")
        if len(set(labels)) == 2:
            tracking.log_figure(confusion_figure(labels, probs, classifier.threshold, name),
                                f"evaluation/confusion_{name}.png")
            tracking.log_figure(roc_figure(labels, probs, classifier.threshold, name), f"evaluation/roc_{name}.png")
    return {"name": name, "threshold": classifier.threshold, **metrics}
