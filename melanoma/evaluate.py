"""Metrics from labels and malignant probabilities, the operating point, and report figures.

Malignant (label 1) is the positive class: sensitivity is malignant recall, specificity benign
recall. A probability at or above the threshold means "malignant".
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve  # noqa: E402

from melanoma.data.layout import CLASSES  # noqa: E402


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The metrics defined for these labels: all of them when both classes are present;
    for a single-class set only accuracy and that class's recall (specificity or sensitivity)."""
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
    return metrics


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on these labels is at least ``target``."""
    positives = np.sort(np.asarray(probs)[np.asarray(labels) == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("cannot choose a threshold for a target sensitivity without malignant images")
    needed = max(1, math.ceil(target * len(positives) - 1e-9))
    return float(positives[needed - 1])


def confusion_figure(labels: np.ndarray, probs: np.ndarray, threshold: float, title: str) -> plt.Figure:
    """Confusion matrix with counts and row rates (recall per true class)."""
    pred = (np.asarray(probs) >= threshold).astype(int)
    counts = confusion_matrix(labels, pred, labels=[0, 1])
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{counts[i, j]}\n{rates[i, j]:.1%}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=12)
    ax.set_xticks([0, 1], CLASSES)
    ax.set_yticks([0, 1], CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\nthreshold {threshold:.3f}", fontsize=10)
    fig.tight_layout()
    return fig


def roc_figure(labels: np.ndarray, probs: np.ndarray, threshold: float, title: str) -> plt.Figure:
    """ROC curve with the operating point marked."""
    fpr, tpr, _ = roc_curve(labels, probs)
    m = classification_metrics(labels, probs, threshold)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot(fpr, tpr, label=f"AUC {m['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=0.8)
    ax.scatter([1 - m["specificity"]], [m["sensitivity"]], c="red", zorder=3,
               label=f"threshold {threshold:.3f}: sens {m['sensitivity']:.2f}, spec {m['specificity']:.2f}")
    ax.set_xlabel("1 - specificity (benign called malignant)")
    ax.set_ylabel("sensitivity (malignant found)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def history_figure(history: list[dict[str, float]]) -> plt.Figure:
    """Loss and validation metrics per epoch, for a quick look without the MLflow UI."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key in ("train_loss", "val_loss"):
        left.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_accuracy", "val_accuracy", "val_auc"):
        right.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
