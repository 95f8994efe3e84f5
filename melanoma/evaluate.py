"""Metrics from labels and malignant probabilities, the operating point, scoring a folder.

Malignant (label 1) is the positive class: sensitivity is malignant recall, specificity benign
recall. A probability at or above the threshold means "malignant".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from melanoma.classifier.errors import SettingsError
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.data.dataset import PreparedData, prepare_dataset


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The metrics defined for these labels: all of them when both classes are present;
    for a single-class set only accuracy and that class's recall (specificity or sensitivity).

    Besides the rates at ``threshold``: balanced accuracy (the ISIC 2018/2019 ranking metric),
    ROC AUC, the partial AUC above 80 % sensitivity as ISIC 2024 scores it, average precision,
    and the specificity reachable at 90 % and 95 % sensitivity.
    """
    labels = np.asarray(labels)
    pred = (np.asarray(probs) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    metrics = {"accuracy": float((tp + tn) / len(labels))}
    has_pos, has_neg = tp + fn > 0, tn + fp > 0
    if has_pos:
        metrics["sensitivity"] = float(tp / (tp + fn))
    if has_neg:
        metrics["specificity"] = float(tn / (tn + fp))
    if has_pos and has_neg:
        metrics["balanced_accuracy"] = (metrics["sensitivity"] + metrics["specificity"]) / 2
        metrics["auc"] = float(roc_auc_score(labels, probs))
        metrics["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
        metrics["pauc_above_80_sensitivity"] = partial_auc_above_sensitivity(labels, probs, 0.8)
        metrics["average_precision"] = float(average_precision_score(labels, probs))
        for target in (0.90, 0.95):
            metrics[f"specificity_at_{round(target * 100)}_sensitivity"] = specificity_at_sensitivity(
                labels, probs, target)
    return metrics


def partial_auc_above_sensitivity(labels: np.ndarray, probs: np.ndarray, min_sensitivity: float = 0.8) -> float:
    """The area between the ROC curve and the line sensitivity = ``min_sensitivity``, where the
    curve is above it: ISIC 2024's score (raw, not McClish-normalised; 0 to 1 - min_sensitivity).

    Computed as ISIC 2024 does: scikit-learn's partial AUC up to a false-positive rate of
    1 - min_sensitivity with both classes swapped, with its McClish normalisation undone.
    """
    max_fpr = 1 - min_sensitivity
    scaled = roc_auc_score(1 - np.asarray(labels), -np.asarray(probs, dtype=np.float64), max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / 0.5 * (scaled - 0.5))


def specificity_at_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The specificity of the highest threshold that still finds ``target`` of the melanomas."""
    threshold = threshold_for_sensitivity(labels, probs, target)
    benign = np.asarray(probs)[np.asarray(labels) == 0]
    return float(np.mean(benign < threshold))


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on these labels is at least ``target``."""
    positives = np.sort(np.asarray(probs)[np.asarray(labels) == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("cannot choose a threshold for a target sensitivity without malignant images")
    needed = max(1, math.ceil(target * len(positives) - 1e-9))
    return float(positives[needed - 1])


@dataclass(frozen=True)
class Predictions:
    """A set's labels, calibrated malignant probabilities and resampling groups (a lesion's photos)."""

    labels: np.ndarray
    probs: np.ndarray
    groups: np.ndarray


@dataclass(frozen=True)
class OperatingPoint:
    """The decision threshold chosen on validation, and the validation metrics at it."""

    threshold: float
    metrics: dict[str, float]


def operating_point(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float) -> OperatingPoint:
    """The threshold that finds ``target_sensitivity`` of the melanomas in ``labels``, and the
    metrics there."""
    threshold = threshold_for_sensitivity(labels, probs, target_sensitivity)
    return OperatingPoint(threshold, classification_metrics(labels, probs, threshold))


def score_folder(engine, folder: str | Path, spec: PreprocessSpec) -> tuple[PreparedData, torch.Tensor]:
    """A labelled evaluation folder (decoded through the cache) and an engine's logits
    (``melanoma.classifier.engine``) for each of its images."""
    data = prepare_dataset(folder, spec, require_train=False)
    return data, engine.logits(np.asarray(data.images))


def source_metrics(labels: np.ndarray, probs: np.ndarray, sources: np.ndarray,
                   threshold: float) -> dict[str, dict[str, float]]:
    """Per source, the metrics at ``threshold`` and the image count, where there is more than one
    source (one source's figures are the set's)."""
    names = sorted(set(sources))
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        chosen = np.asarray(sources) == name
        out[name] = {**classification_metrics(labels[chosen], probs[chosen], threshold), "count": int(chosen.sum())}
    return out


def external_names(folders: list[str]) -> dict[str, str]:
    """A metric name per external folder: its own name, or with its parent's when two share a
    name (``/a/test`` and ``/b/test`` become ``a_test`` and ``b_test``)."""
    names = [Path(f).resolve().name for f in folders]
    out: dict[str, str] = {}
    for folder, name in zip(folders, names):
        if names.count(name) > 1:
            name = f"{Path(folder).resolve().parent.name}_{name}"
        if name in out:
            raise SettingsError(f"two external folders would both be reported as {name!r}: {out[name]} and {folder}")
        out[name] = folder
    return out
