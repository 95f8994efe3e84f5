"""Reporting one evaluated set to the active MLflow run: its figures at the operating threshold
with 95 % intervals, its calibration, its ROC and reliability diagrams; a run's data counts.

Shared by training runs, cross-source validation, ``melanoma evaluate`` and site adaptation, so
every set is reported the same way (and ``melanoma evaluate`` loads no training code).
"""

from __future__ import annotations

import numpy as np
import torch

from melanoma import tracking
from melanoma.classifier.calibration import Calibration, brier_score, expected_calibration_error
from melanoma.data.dataset import PreparedData
from melanoma.evaluate import Predictions, classification_metrics
from melanoma.figures import reliability_figure, roc_figure
from melanoma.intervals import bootstrap_intervals, interval_metrics


def dataset_params(data: PreparedData, fit_idx: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray) -> dict:
    params = {"data_digest": data.digest, "data_skipped_files": len(data.skipped),
              "data_sources": ",".join(sorted({str(s) for s in data.sources}))}
    for split, idx in (("train", fit_idx), ("val", val_idx), ("test", test_idx)):
        params[f"data_{split}_count"] = len(idx)
        for name, count in data.class_counts(idx).items():
            params[f"data_{split}_{name}"] = count
    return params


def set_figures(predictions: Predictions, threshold: float, resamples: int, seed: int) -> dict[str, float]:
    """A set's metrics at ``threshold`` with 95 % intervals (whole groups resampled)."""
    p = predictions
    metrics = {**classification_metrics(p.labels, p.probs, threshold), "threshold": threshold, "count": len(p.labels)}
    if resamples:
        metrics.update(interval_metrics(bootstrap_intervals(p.labels, p.probs, threshold, p.groups, resamples, seed)))
    return metrics


def log_set(name: str, prefix: str, labels: np.ndarray, logits: torch.Tensor, calibration: Calibration,
            threshold: float, groups: np.ndarray, resamples: int, seed: int = 0) -> dict[str, float]:
    """One evaluated set's figures at the operating threshold, with 95 % intervals (whole
    duplicate groups resampled), its calibration before and after, and its ROC and reliability
    diagram; returns what was logged under ``prefix``."""
    raw, probs = Calibration().probabilities(logits), calibration.probabilities(logits)
    metrics = {**classification_metrics(labels, probs, threshold), "count": len(labels),
               "mean_malignant_probability": float(np.mean(probs)),
               "ece": expected_calibration_error(labels, probs), "ece_uncalibrated": expected_calibration_error(labels, raw),
               "brier": brier_score(labels, probs), "brier_uncalibrated": brier_score(labels, raw)}
    intervals = bootstrap_intervals(labels, probs, threshold, groups, resamples, seed) if resamples else {}
    metrics.update(interval_metrics(intervals))
    tracking.log_metrics(metrics, prefix=prefix)
    tracking.log_figure(reliability_figure(labels, raw, probs, f"calibration, {name}"),
                        f"evaluation/reliability_{name}.png")
    if len(set(labels)) == 2:
        tracking.log_figure(roc_figure(labels, probs, threshold, f"ROC, {name}", intervals), f"evaluation/roc_{name}.png")
    return metrics
