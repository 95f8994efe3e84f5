"""Score any labelled folder through a logged model and log it as an evaluation run.

The model is loaded as MLflow serves it (the pyfunc, its stored preprocessing, weights and
threshold); the folder is decoded with that preprocessing through the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np

from melanoma import card, tracking
from melanoma import metric_names as names
from melanoma.classifier.logged import load_logged_model
from melanoma.evaluate import score_folder
from melanoma.figures import confusion_figure
from melanoma.reporting import log_set

log = logging.getLogger(__name__)


def evaluate_model_on_folder(model_uri: str, data: str | Path, name: str | None = None, bootstrap: int = 1000) -> dict:
    """Metrics of ``model_uri`` on ``data`` at the model's own threshold, logged as an evaluation
    run tagged with the model and the run that trained it.

    ``data``: a Kaggle layout (its ``test/`` is scored when there is one, else everything),
    ``benign/`` and/or ``malignant/`` folders, or one folder named after a class.
    """
    model = load_logged_model(model_uri)
    prepared, logits = score_folder(model.engine, data, model.spec)
    chosen = prepared.indices("test")
    if not len(chosen):
        chosen = np.arange(len(prepared.labels))
        if len(prepared.indices("train")):
            log.warning("%s has no test/ split; scoring train/ (optimistic if the model trained on it)", data)
    labels, logits = prepared.labels[chosen], logits[chosen]
    name = name or Path(data).resolve().name

    source_run_id = mlflow.models.get_model_info(model_uri).run_id or ""
    with mlflow.start_run(run_name=f"evaluate-{name}"):
        tracking.tag_experiment()
        mlflow.set_tags({"evaluation": "external", "model_uri": model_uri, "source_run_id": source_run_id})
        tracking.log_params({"model_uri": model_uri, "data": str(Path(data).resolve()), "name": name,
                             "threshold": str(model.threshold)})
        metrics = log_set(name, names.EVALUATION.format(name), labels, logits, model.calibration, model.threshold,
                          np.asarray(prepared.md5s)[chosen], bootstrap)
        metrics["skipped_files"] = len(prepared.skipped)
        mlflow.log_metric(f"{name}_skipped_files", len(prepared.skipped))
        if len(set(labels)) == 2:
            tracking.log_figure(confusion_figure(labels, model.calibration.probabilities(logits),
                                                 model.threshold, name), f"evaluation/confusion_{name}.png")
    if source_run_id:
        card.write_card(source_run_id)  # the model's card now lists this evaluation too
    return {"name": name, "threshold": model.threshold, "threshold_rule": model.rule.in_words(), **metrics}
