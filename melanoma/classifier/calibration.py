"""Calibrated probabilities: temperature scaling (or isotonic regression) fitted on validation.

A calibrated "0.8" means that about 80 of 100 lesions given it are melanomas, on data like the
validation split. The fitted map is stored with the model and applied by the served model;
applying it needs only numpy, fitting isotonic regression needs scikit-learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from melanoma.classifier.errors import SettingsError

METHODS = ("temperature", "isotonic", "none")
ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class Calibration:
    """A monotone map from the network's logits to calibrated malignant probabilities."""

    method: str = "none"
    temperature: float = 1.0
    isotonic_x: list[float] = field(default_factory=list)  # raw probability knots, increasing
    isotonic_y: list[float] = field(default_factory=list)  # calibrated probability at each knot

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Malignant probability for logits (N, 2)."""
        if self.method == "temperature":
            return torch.softmax(logits.float() / self.temperature, dim=1)[:, 1].numpy()
        raw = torch.softmax(logits.float(), dim=1)[:, 1].numpy()
        if self.method == "isotonic":
            return np.interp(raw, self.isotonic_x, self.isotonic_y)
        return raw

    def to_dict(self) -> dict:
        return asdict(self)


def fit_temperature(logits: torch.Tensor, labels: np.ndarray) -> Calibration:
    """The temperature that minimises the negative log-likelihood of ``labels`` (one parameter,
    fitted by L-BFGS on its logarithm, so it stays positive)."""
    logits = logits.detach().float().clone()  # a normal tensor: predict_logits returns inference tensors
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # Perfectly separated validation data pushes the temperature to zero (probabilities of exactly
    # 0 and 1); the bounds keep a usable ranking of new images.
    return Calibration("temperature", temperature=float(log_t.detach().exp().clamp(*TEMPERATURE_BOUNDS)))


def fit_isotonic(logits: torch.Tensor, labels: np.ndarray) -> Calibration:
    """Isotonic regression of the labels on the raw probability, stored as its knots."""
    from sklearn.isotonic import IsotonicRegression

    raw = torch.softmax(logits.float(), dim=1)[:, 1].numpy()
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, np.asarray(labels))
    return Calibration("isotonic", isotonic_x=iso.X_thresholds_.tolist(), isotonic_y=iso.y_thresholds_.tolist())


def fit_calibration(method: str, logits: torch.Tensor, labels: np.ndarray) -> Calibration:
    if method == "temperature":
        return fit_temperature(logits, labels)
    if method == "isotonic":
        return fit_isotonic(logits, labels)
    if method == "none":
        return Calibration()
    raise SettingsError(f"calibration must be one of {METHODS}, got {method!r}")


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |observed malignant share - mean predicted probability| over equal-width probability
    bins, weighted by how many images fall in each (the usual ECE, positive class)."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    index = np.minimum((probs * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, labels, bins) - np.bincount(index, probs, bins))
    return float(gap.sum() / max(1, counts.sum()))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels)) ** 2))


def reliability_curve(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per non-empty bin: mean predicted probability, observed malignant share, count."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    index = np.minimum((probs * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    kept = counts > 0
    predicted = np.bincount(index, probs, bins)[kept] / counts[kept]
    observed = np.bincount(index, labels, bins)[kept] / counts[kept]
    return predicted, observed, counts[kept]
