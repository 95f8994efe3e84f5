"""Report figures: confusion matrices, ROC with the operating point, training history, Grad-CAM panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from melanoma.classifier.calibration import reliability_curve  # noqa: E402
from melanoma.data.records import CLASSES  # noqa: E402
from melanoma.evaluate import classification_metrics  # noqa: E402


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


def roc_figure(labels: np.ndarray, probs: np.ndarray, threshold: float, title: str,
               intervals: dict[str, tuple[float, float]] | None = None) -> plt.Figure:
    """ROC curve with the operating point marked (with its 95 % intervals when given)."""
    fpr, tpr, _ = roc_curve(labels, probs)
    m = classification_metrics(labels, probs, threshold)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    auc_label = f"AUC {m['auc']:.3f}"
    if intervals and "auc" in intervals:
        auc_label += " ({:.3f}-{:.3f})".format(*intervals["auc"])
    ax.plot(fpr, tpr, label=auc_label)
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=0.8)
    x, y = 1 - m["specificity"], m["sensitivity"]
    if intervals and {"sensitivity", "specificity"} <= set(intervals):
        (s_low, s_high), (p_low, p_high) = intervals["sensitivity"], intervals["specificity"]
        ax.errorbar([x], [y], xerr=[[x - (1 - p_high)], [(1 - p_low) - x]], yerr=[[y - s_low], [s_high - y]],
                    c="red", capsize=3, lw=1)
    ax.scatter([x], [y], c="red", zorder=3,
               label=f"threshold {threshold:.3f}: sens {m['sensitivity']:.2f}, spec {m['specificity']:.2f}")
    ax.set_xlabel("1 - specificity (benign called malignant)")
    ax.set_ylabel("sensitivity (malignant found)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, title: str) -> plt.Figure:
    """Observed malignant share against predicted probability, before and after calibration."""
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=0.8, label="perfectly calibrated")
    for probs, name in ((raw, "uncalibrated"), (calibrated, "calibrated")):
        predicted, observed, counts = reliability_curve(labels, probs)
        ax.plot(predicted, observed, marker="o", label=name)
    ax.set_xlabel("predicted malignant probability")
    ax.set_ylabel("observed share malignant")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def sets_figure(rows: dict[str, dict[str, float]]) -> plt.Figure:
    """Sensitivity and specificity at the operating threshold for every evaluated set, with
    their 95 % intervals: how the operating point travels from validation to other data."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(4.6, 1.3 * len(names) + 2), 3.8))
    width = 0.38
    for offset, metric in ((-width / 2, "sensitivity"), (width / 2, "specificity")):
        xs, values, errors = [], [], [[], []]
        for i, name in enumerate(names):
            if metric in rows[name]:
                value = rows[name][metric]
                low, high = rows[name].get(f"{metric}_ci_low", value), rows[name].get(f"{metric}_ci_high", value)
                xs.append(i + offset)
                values.append(value)
                errors[0].append(value - low)
                errors[1].append(high - value)
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=metric)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("at the operating threshold, with 95 % intervals", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def crossval_figure(rows: dict[str, dict[str, float]]) -> plt.Figure:
    """Each held-out source's AUC with its 95 % interval: the model at clinics it never saw."""
    names = [n for n in rows if "auc" in rows[n]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6))
    values = [rows[n]["auc"] for n in names]
    errors = [[v - rows[n].get("auc_ci_low", v) for n, v in zip(names, values)],
              [rows[n].get("auc_ci_high", v) - v for n, v in zip(names, values)]]
    ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="tab:purple")
    for i, v in enumerate(values):
        ax.text(i, 0.02, f"{v:.3f}", ha="center", color="white", fontsize=9)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("AUC on the held-out source")
    ax.set_title("each source scored by a model trained without it", fontsize=10)
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


def gradcam_panel(panels: list[np.ndarray], labels: np.ndarray, probs: np.ndarray, threshold: float) -> plt.Figure:
    """Grad-CAM examples, two per row: each the photo beside its overlay, titled with the true
    label, the malignant probability and the decision at the operating threshold."""
    cols, rows = 2, (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(9.4, 2.75 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel, label, prob in zip(axes.ravel(), panels, labels, probs):
        decision = CLASSES[int(prob >= threshold)]
        verdict = "right" if decision == CLASSES[label] else "WRONG"
        ax.imshow(panel)
        ax.set_title(f"true {CLASSES[label]} | p(malignant) {prob:.2f} | called {decision} ({verdict})", fontsize=9)
    fig.suptitle(f"Grad-CAM for the predicted class on the photo (box: what the model saw); "
                 f"operating threshold {threshold:.3f}", fontsize=9)
    fig.tight_layout()
    return fig
