"""95 % bootstrap confidence intervals for AUC, sensitivity, specificity and balanced accuracy.

Resampling draws whole groups (a lesion's photos, or a set of duplicates) with replacement, so
photos of one lesion never count as independent evidence. All resamples are computed at once
from per-image weights: each resample is a vector of how often every image was drawn.
"""

from __future__ import annotations

import numpy as np

INTERVAL_METRICS = ("auc", "sensitivity", "specificity", "balanced_accuracy")


def bootstrap_weights(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, N) draw counts per image: groups drawn with replacement, as many as there are."""
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = group_of.max() + 1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=resamples)
    return counts[:, group_of].astype(np.float64)


def weighted_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of ``weights`` (R, N): the weighted share of (malignant, benign)
    pairs ranked right, ties counting half."""
    values, rank = np.unique(np.asarray(probs), return_inverse=True)
    positive = np.asarray(labels) == 1
    pos = np.zeros((len(weights), len(values)))
    neg = np.zeros((len(weights), len(values)))
    np.add.at(pos.T, rank[positive], weights[:, positive].T)
    np.add.at(neg.T, rank[~positive], weights[:, ~positive].T)
    below = np.cumsum(neg, axis=1) - neg  # benign weight strictly below each value
    ordered = (pos * (below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ordered / (pos.sum(axis=1) * neg.sum(axis=1))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, groups: np.ndarray | None = None,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals ``{metric: (low, high)}`` for the metrics defined on these labels
    (AUC and balanced accuracy need both classes); ``groups`` default to one per image."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    weights = bootstrap_weights(groups, resamples, seed)
    malignant, called = labels == 1, np.asarray(probs) >= threshold
    stats = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if malignant.any():
            stats["sensitivity"] = (weights * (malignant & called)).sum(1) / (weights * malignant).sum(1)
        if (~malignant).any():
            stats["specificity"] = (weights * (~malignant & ~called)).sum(1) / (weights * ~malignant).sum(1)
    if malignant.any() and (~malignant).any():
        stats["balanced_accuracy"] = (stats["sensitivity"] + stats["specificity"]) / 2
        stats["auc"] = weighted_auc(labels, probs, weights)
    tail = (1 - level) / 2 * 100
    return {name: tuple(float(v) for v in np.nanpercentile(values, [tail, 100 - tail]))
            for name, values in stats.items()}


def interval_metrics(intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``{metric}_ci_low`` / ``{metric}_ci_high`` for logging beside the point estimates."""
    return {f"{name}_ci_{side}": value for name, (low, high) in intervals.items()
            for side, value in (("low", low), ("high", high))}
