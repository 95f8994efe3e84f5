"""Whether a photo is one the model is made for: a dermoscopy photo like its training photos.

The scope score is a distance of a photo's feature statistics (the mean and standard deviation
of each channel at every stage of the network, shallow to deep) to those of the training photos:
the Mahalanobis distance within their principal subspace plus the distance off it (the subspace
keeps it cheap and well conditioned with a few thousand photos). It is fitted when a model is
logged, its threshold set so that a stated share of every training source's validation photos is
in scope, and it runs inside the exported graph, on the photo's own view, beside the logits.
The penultimate features alone, the max-logit and the energy scores were measured and caught
almost nothing on a real model (docs/results.md): a fine-tuned classifier maps unfamiliar
pictures onto familiar features, while the statistics of its earlier stages still see them.

Skin photos taken without a dermoscope sit close to dermoscopy in that distance. Given pictures
known to be out of scope (``learn_boundary``), the check also learns a boundary on the same
statistics (a logistic regression), and a photo is out of scope when either the distance or the
boundary puts it beyond nearly all the validation photos; the score is then the larger of the
two, each as a ratio to its own limit.

A dermoscopy photo is never grey, while radiographs, scans and black-and-white photos are, and
the statistics do not reliably tell (docs/results.md). So a colour model's check also has a
colour limit, a tenth of the colour spread of the palest validation photos: a picture with less
colour than that has its score multiplied by how much less.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from melanoma.classifier.models import feature_stages

SCOPE_FILE = "scope.pt"
IN_SCOPE_SHARE = 0.99  # of the validation photos, in scope by construction
COMPONENTS = 64
GREY_SHARE = 0.1  # the colour limit, as a share of the palest validation photos' colour spread
BOUNDARY_C = 0.1  # the learned boundary's inverse regularisation (the value measured: docs/results.md)


class ScopeModel(nn.Module):
    """Features (N, D) -> scope score (N,): larger is further from the training photos."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scales: torch.Tensor, residual_scale: torch.Tensor,
                 threshold: float = float("inf"), boundary: dict[str, torch.Tensor] | None = None,
                 colour_limit: float | None = None):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("components", components.float())  # (D, K), orthonormal columns
        self.register_buffer("scales", scales.float())  # (K,) the features' spread along each
        self.register_buffer("residual_scale", residual_scale.float().reshape(()))  # spread off the subspace
        self.threshold = float(threshold)
        self.learned = boundary is not None
        for name, value in (boundary or {}).items():  # BOUNDARY_KEYS
            self.register_buffer(name, value.float())
        self.coloured = colour_limit is not None
        if self.coloured:
            self.register_buffer("colour_limit", torch.tensor(float(colour_limit)))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """The distance to the training photos' statistics (N,)."""
        centred = features.float() - self.mean
        inside = centred @ self.components
        residual = centred - inside @ self.components.T
        within = ((inside / self.scales) ** 2).mean(1)
        off = (residual ** 2).sum(1) / self.residual_scale ** 2
        return torch.sqrt(within + off)

    def forward(self, features: torch.Tensor, colour: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (N,) of features (N, D); ``colour``: the pictures' ``colourfulness`` (N,), which
        a check with a colour limit needs."""
        score = self.distance(features)
        if self.learned:
            odds = ((features.float() - self.boundary_mean) / self.boundary_scale) @ self.boundary_weight + self.boundary_bias
            score = torch.maximum(score / self.distance_limit, torch.sigmoid(odds) / torch.sigmoid(self.boundary_limit))
        if self.coloured:
            if colour is None:
                raise ValueError("this in-scope check has a colour limit: pass the pictures' colourfulness")
            score = score * (self.colour_limit / colour.float().clamp_min(1e-3 * self.colour_limit)).clamp_min(1)
        return score

    def state(self) -> dict[str, torch.Tensor]:
        """What is stored with the model (``torch.load(weights_only=True)`` reads it back)."""
        return {**{k: v.cpu() for k, v in self.state_dict().items()}, "threshold": torch.tensor(self.threshold)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> ScopeModel:
        boundary = {k: state[k] for k in BOUNDARY_KEYS} if "boundary_weight" in state else None
        colour_limit = float(state["colour_limit"]) if "colour_limit" in state else None
        return cls(state["mean"], state["components"], state["scales"], state["residual_scale"],
                   float(state["threshold"]), boundary, colour_limit)

    def with_colour_limit(self, validation_colour: np.ndarray, share: float = IN_SCOPE_SHARE) -> ScopeModel:
        """This check with a colour limit: ``GREY_SHARE`` of the colour spread that all but
        (1 - ``share``) / 2 of the validation photos reach."""
        palest = float(np.quantile(np.asarray(validation_colour, np.float64), (1 - share) / 2))
        return ScopeModel.from_state({**self.state(), "colour_limit": torch.tensor(GREY_SHARE * palest)})


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Each picture's spread across its colour channels, averaged over its pixels, in [0, 1]
    pixel units (N,): 0 for a grey picture. ``images``: uint8 (N, C, H, W)."""
    return images.float().div(255).std(1).mean((1, 2))


BOUNDARY_KEYS = ("boundary_mean", "boundary_scale", "boundary_weight", "boundary_bias", "distance_limit",
                 "boundary_limit")


def fit_scope(features: np.ndarray, components: int = COMPONENTS) -> ScopeModel:
    """The scope model of training photos' features (N, D); its threshold is set separately."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    mean = x.mean(0)
    centred = x - mean
    k = max(1, min(components, x.shape[0] - 1, x.shape[1] - 1))
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:k].T
    scales = (singular[:k] / np.sqrt(max(1, x.shape[0] - 1))).clamp_min(1e-6)
    residual = centred - centred @ basis @ basis.T
    spread = centred.pow(2).sum(1).mean().sqrt()
    residual_scale = residual.pow(2).sum(1).mean().sqrt().clamp_min(1e-3 * float(spread) + 1e-12)
    return ScopeModel(mean, basis, scales, residual_scale)


def learn_boundary(scope: ScopeModel, inside: np.ndarray, outside: np.ndarray, validation: np.ndarray,
                   share: float = IN_SCOPE_SHARE) -> ScopeModel:
    """``scope`` with a boundary learned between the features of training photos (``inside``) and
    of pictures known to be out of scope (``outside``): a class-balanced, strongly regularised
    logistic regression on standardised features. The distance and the boundary each get a limit
    that keeps (1 + ``share``) / 2 of the ``validation`` features in, so that together they keep
    about ``share``; the final threshold is set on the served scores as without a boundary."""
    from sklearn.linear_model import LogisticRegression  # here: not among the served model's requirements

    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    # A floor under each feature's spread: a nearly constant statistic must not blow up in float32.
    mean, scale = inside.mean(0), inside.std(0) + 0.01 * inside.std(0).mean() + 1e-12
    fitted = LogisticRegression(C=BOUNDARY_C, class_weight="balanced", max_iter=2000).fit(
        (np.concatenate([inside, outside]) - mean) / scale, np.r_[np.zeros(len(inside)), np.ones(len(outside))])
    weight, bias = fitted.coef_[0], fitted.intercept_[0]
    val = torch.as_tensor(np.asarray(validation), dtype=torch.float32)
    limit_share = 1 - (1 - share) / 2
    boundary = {"boundary_mean": torch.as_tensor(mean), "boundary_scale": torch.as_tensor(scale),
                "boundary_weight": torch.as_tensor(weight), "boundary_bias": torch.tensor(bias),
                "distance_limit": torch.tensor(threshold_for_share(scope.distance(val).numpy(), limit_share)),
                "boundary_limit": torch.tensor(threshold_for_share((np.asarray(validation) - mean) / scale @ weight + bias,
                                                                   limit_share))}
    return ScopeModel.from_state({**scope.state(), **boundary})


def threshold_for_share(scores: np.ndarray, share: float = IN_SCOPE_SHARE) -> float:
    """The score below which ``share`` of ``scores`` (validation photos) fall."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), share, method="higher"))


def threshold_for_sources(scores: np.ndarray, sources: np.ndarray, share: float = IN_SCOPE_SHARE) -> float:
    """The score below which ``share`` of all ``scores`` and of every source's fall: the largest of
    the pooled threshold and the sources' own. A pooled threshold alone lets the largest source
    decide, and a smaller one's photos become the ones left out (and a new clinic's with them:
    docs/results.md). A source with too few photos to leave (1 - ``share``) of them out counts
    in the pooled threshold only: its own would be its single furthest photo."""
    scores, sources = np.asarray(scores), np.asarray(sources)
    enough = int(np.ceil(1 / (1 - share) - 1e-9))
    return max([threshold_for_share(scores, share)] + [threshold_for_share(scores[sources == source], share)
                                                       for source in np.unique(sources)
                                                       if np.sum(sources == source) >= enough])


def stage_statistics(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Each channel's mean and standard deviation over the feature map (N, 2C)."""
    return torch.cat([output.mean((2, 3)), output.std((2, 3))], 1)


def logits_and_features(network: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's logits and the statistics of its stages (N, D), from one forward pass; the
    hooks live only for the call, so they are traced into an exported graph and never left behind."""
    caught: list[torch.Tensor] = []
    handles = [stage.register_forward_hook(lambda *args: caught.append(stage_statistics(*args)))
               for stage in feature_stages(network)]
    try:
        logits = network(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, torch.cat(caught, 1)
