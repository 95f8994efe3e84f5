"""Score any labelled folder through a logged model, exactly as a client would, and log it.

The images travel as base64 file bytes through the pyfunc, so what is measured is what a served
model answers, preprocessing included.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from melanoma import tracking
from melanoma.data import Source, discover
from melanoma.evaluate import classification_metrics, confusion_figure, roc_figure

log = logging.getLogger(__name__)


def evaluation_records(source: Source) -> list:
    """The images to score: a Kaggle layout's test/ when it has one, else everything found."""
    records = discover(source, require_train=False)
    test = [r for r in records if r.split == "test"]
    if test:
        return test
    if any(r.split == "train" for r in records):
        log.warning("%s has no test/ split; scoring train/ (optimistic if the model trained on it)", source.location)
    return records


def score_files(pyfunc, source: Source, paths: list[str], batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Malignant probabilities per file (NaN where the model refused the file), and the refused paths."""
    probs = np.full(len(paths), np.nan)
    refused = []
    for start in tqdm(range(0, len(paths), batch_size), desc="scoring", unit="batch"):
        chunk = paths[start:start + batch_size]
        encoded = [base64.b64encode(source.read(p)).decode("ascii") for p in chunk]
        try:
            probs[start:start + len(chunk)] = pyfunc.predict(pd.DataFrame({"image": encoded}))["malignant_probability"]
        except MlflowException:  # one bad file fails the batch: score the files one by one
            for i, (path, value) in enumerate(zip(chunk, encoded)):
                try:
                    probs[start + i] = pyfunc.predict(pd.DataFrame({"image": [value]}))["malignant_probability"][0]
                except MlflowException as exc:
                    log.warning("skipping %s: %s", path, exc.message)
                    refused.append(path)
    return probs, refused


def evaluate_model_on_folder(model_uri: str, data: str | Path, name: str | None = None) -> dict:
    """Metrics of ``model_uri`` on ``data`` at the model's own threshold, logged as an evaluation
    run tagged with the model and the run that trained it."""
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    threshold = float(pyfunc.unwrap_python_model().threshold)
    source = Source(data)
    try:
        records = evaluation_records(source)
        probs, refused = score_files(pyfunc, source, [r.path for r in records])
    finally:
        source.close()
    name = name or Path(data).resolve().name
    scored = ~np.isnan(probs)
    labels = np.array([r.label for r in records])[scored]
    probs = probs[scored]
    metrics = classification_metrics(labels, probs, threshold)
    metrics.update(count=int(scored.sum()), skipped_files=len(refused), mean_malignant_probability=float(probs.mean()))

    with mlflow.start_run(run_name=f"evaluate-{name}"):
        mlflow.set_tags({"evaluation": "external", "model_uri": model_uri,
                         "source_run_id": mlflow.models.get_model_info(model_uri).run_id or ""})
        mlflow.log_params({"model_uri": model_uri, "data": str(Path(data).resolve()), "name": name,
                           "threshold": threshold})
        tracking.log_metrics(metrics, prefix=f"{name}_")
        if len(set(labels)) == 2:
            tracking.log_figure(confusion_figure(labels, probs, threshold, name), f"evaluation/confusion_{name}.png")
            tracking.log_figure(roc_figure(labels, probs, threshold, name), f"evaluation/roc_{name}.png")
    return {"name": name, "threshold": threshold, **metrics}
