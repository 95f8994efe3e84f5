"""Fine-tuning a logged model on a clinic's own labelled photos, judged by cross-fitting.

A site's photos are split into folds that keep a patient's (or lesion's) photos together; for
each fold the model is fine-tuned on the others and scores it, after every epoch. The
out-of-fold scores are scores of photos the scoring model never trained on: they choose the
recipe and the number of epochs, estimate the gain over the base model with a bootstrap
interval, and give the site's calibration and threshold. What the site serves is, by default,
those very fold models averaged. Pure library code: no MLflow.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score as roc_auc
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from tqdm import tqdm

from melanoma.classifier.errors import SettingsError
from melanoma.classifier.inference import Scorer, autocast, predict_logits
from melanoma.classifier.models import classifier_head
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.data.records import DataError, missing_classes
from melanoma.train import augment, class_weights

log = logging.getLogger(__name__)

LAYERS = ("all", "head")
# What a site version serves once fine-tuning is accepted: "folds", the cross-fitting's fold
# models averaged (the models whose out-of-fold scores set the site's calibration and threshold,
# one forward pass each), or "all", one model fine-tuned on all the photos (one pass; its scores
# are on another scale than the ones its threshold was chosen on: docs/results.md).
SITE_MODELS = ("folds", "all")
MIN_PER_FOLD = 2  # melanomas and benign photos each fold must hold at least


@dataclass(frozen=True)
class Recipe:
    """What is fine-tuned, and at which learning rate (AdamW, constant: an epoch's snapshot is
    the model a shorter run would give)."""

    layers: str  # all | head (the classifier head alone, BatchNorm statistics kept)
    lr: float

    def __str__(self) -> str:
        return f"{self.layers}:{self.lr:g}"


def parse_recipes(text: str) -> list[Recipe]:
    """``"all:1e-4,head:1e-3"`` -> recipes; a clear error for anything else."""
    recipes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        layers, _, lr = item.partition(":")
        try:
            recipe = Recipe(layers, float(lr))
        except ValueError:
            raise SettingsError(f"fine-tuning recipe {item!r}: write LAYERS:LR, e.g. all:1e-4") from None
        if layers not in LAYERS or not recipe.lr > 0:
            raise SettingsError(f"fine-tuning recipe {item!r}: layers must be one of {LAYERS} and lr positive")
        recipes.append(recipe)
    if not recipes:
        raise SettingsError("no fine-tuning recipe given (e.g. all:1e-4,head:1e-3)")
    return recipes


def site_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs: each photo held out once, a group's photos on one side,
    both classes in every fold; a ``DataError`` with the counts where the site has too few."""
    labels = np.asarray(labels)
    if missing_classes(labels):
        raise DataError(f"the site's photos have no {' or '.join(missing_classes(labels))} images: fine-tuning "
                        "needs both classes")
    counts = np.bincount(labels, minlength=2)
    if folds < 2 or counts.min() < folds * MIN_PER_FOLD:
        raise DataError(f"{folds}-fold cross-fitting needs at least {folds * MIN_PER_FOLD} photos of each class; "
                        f"the site has {counts[1]} melanomas and {counts[0]} benign photos (use fewer --folds, or "
                        "label more photos)")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    pairs = list(splitter.split(np.zeros(len(labels)), labels, groups))
    if any(len(set(labels[held])) < 2 for _, held in pairs):
        raise DataError(f"the site's {len(set(groups))} patients cannot be split into {folds} folds holding both "
                        "classes each: use fewer --folds")
    return pairs


def trainable_parameters(network: nn.Module, layers: str) -> list[nn.Parameter]:
    """The parameters a recipe fine-tunes (an ensemble's ``nn.ModuleList``: each member's)."""
    members = list(network) if isinstance(network, nn.ModuleList) else [network]
    if layers == "all":
        return [p for m in members for p in m.parameters()]
    return [p for m in members for p in classifier_head(m).parameters()]


def finetune(network: nn.Module, spec: PreprocessSpec, images: np.ndarray, labels: np.ndarray, recipe: Recipe,
             epochs: int, device: torch.device, seed: int = 0, batch_size: int = 32,
             replay: tuple[np.ndarray, np.ndarray] | None = None, replay_share: float = 0.0,
             on_epoch: Callable[[int, Scorer], None] | None = None) -> nn.Module:
    """A copy of ``network`` fine-tuned on uint8 ``images`` (flips, class-weighted loss,
    AdamW at a constant rate). With ``replay`` (images and labels of the training sources),
    ``replay_share`` of every batch comes from them. ``on_epoch(epoch, scorer)`` sees the model
    after each epoch, in eval mode. An ensemble trains on its averaged logits. The seed fixes
    everything random (order, flips, dropout), so a run can be repeated (exactly on the CPU)."""
    tuned = copy.deepcopy(network).to(device).float()
    scorer = Scorer(tuned, spec).to(device)
    for p in tuned.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(tuned, recipe.layers)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    site_images, site_labels = torch.from_numpy(np.asarray(images)), torch.from_numpy(np.asarray(labels))
    weights = class_weights(np.asarray(labels)).to(device)
    n_replay = int(round(batch_size * replay_share)) if replay is not None else 0
    step = batch_size - n_replay  # site photos per batch
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout's draws seeded, the caller's left alone
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            tuned.train(recipe.layers == "all")  # head alone: BatchNorm statistics stay the model's
            order = torch.randperm(len(site_images), generator=generator)
            for start in tqdm(range(0, len(order), step), desc=f"fine-tune {recipe} epoch {epoch}", leave=False):
                idx = order[start:start + step]
                x, y = site_images[idx], site_labels[idx]
                if n_replay:
                    pick = torch.randint(0, len(replay[0]), (n_replay,), generator=generator)
                    x = torch.cat([x, torch.from_numpy(np.asarray(replay[0][pick.numpy()]))])
                    y = torch.cat([y, torch.from_numpy(np.asarray(replay[1][pick.numpy()]))])
                x = augment(x.to(device).float().div_(255), "flip", generator)
                with autocast(device):
                    loss = F.cross_entropy(scorer(x).float(), y.to(device), weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            tuned.eval()
            if on_epoch is not None:
                on_epoch(epoch, scorer)
    for p in tuned.parameters():
        p.requires_grad_(True)
    return tuned.eval()


@dataclass
class CrossFit:
    """Out-of-fold logits of the base model and of each (recipe, epoch) fine-tuned on the other folds."""

    labels: np.ndarray
    groups: np.ndarray
    base: torch.Tensor  # (N, 2)
    tuned: dict[tuple[str, int], torch.Tensor]  # (recipe, epoch) -> (N, 2), each photo scored by a model that never saw it
    recipes: dict[str, Recipe]

    def auc(self, key: tuple[str, int] | None = None) -> float:
        logits = self.base if key is None else self.tuned[key]
        return roc_auc(self.labels, torch.softmax(logits.float(), 1)[:, 1].numpy())

    def best(self) -> tuple[Recipe, int]:
        """The recipe and epoch count with the highest out-of-fold AUC (the earliest on a tie)."""
        name, epochs = max(self.tuned, key=lambda k: (self.auc(k), -k[1]))
        return self.recipes[name], epochs


def cross_fit(network: nn.Module, spec: PreprocessSpec, images: np.ndarray, labels: np.ndarray, groups: np.ndarray,
              recipes: list[Recipe], epochs: int, folds: int, device: torch.device, seed: int = 0,
              replay: tuple[np.ndarray, np.ndarray] | None = None, replay_share: float = 0.0) -> CrossFit:
    """Fine-tune on all folds but one, score that one after every epoch, for each recipe."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    pairs = site_folds(labels, groups, folds, seed)
    base = predict_logits(Scorer(network, spec).to(device), images, None, device)
    tuned = {(str(r), e): torch.zeros(len(labels), 2) for r in recipes for e in range(1, epochs + 1)}
    for fold, (train, held) in enumerate(pairs):
        for recipe in recipes:
            def score(epoch: int, scorer: Scorer) -> None:
                tuned[(str(recipe), epoch)][held] = predict_logits(scorer, images[held], None, device)

            log.info("cross-fitting fold %d/%d, %s", fold + 1, len(pairs), recipe)
            finetune(network, spec, images[train], labels[train], recipe, epochs, device, seed + fold, replay=replay,
                     replay_share=replay_share, on_epoch=score)
    return CrossFit(labels, groups, base, tuned, {str(r): r for r in recipes})


def fold_models(network: nn.Module, spec: PreprocessSpec, images: np.ndarray, labels: np.ndarray,
                groups: np.ndarray, recipe: Recipe, epochs: int, folds: int, device: torch.device, seed: int = 0,
                replay: tuple[np.ndarray, np.ndarray] | None = None, replay_share: float = 0.0) -> nn.ModuleList:
    """The models ``cross_fit`` fine-tuned for ``recipe`` and ``epochs``, fine-tuned again (the same
    folds and seeds), as one ensemble: each member (each base member, for an ensemble) as it was
    when its out-of-fold photos were scored."""
    pairs = site_folds(np.asarray(labels), np.asarray(groups), folds, seed)
    members = []
    for fold, (train, _) in enumerate(pairs):
        log.info("fold model %d/%d, %s for %d epochs", fold + 1, len(pairs), recipe, epochs)
        tuned = finetune(network, spec, images[train], labels[train], recipe, epochs, device, seed + fold,
                         replay=replay, replay_share=replay_share)
        members += list(tuned) if isinstance(tuned, nn.ModuleList) else [tuned]
    return nn.ModuleList(members).eval()


def auc_gain_interval(labels: np.ndarray, before: np.ndarray, after: np.ndarray, groups: np.ndarray,
                      resamples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The bootstrap interval of AUC(after) - AUC(before) on the same photos (whole groups
    resampled, both scores on each resample: a paired interval)."""
    _, group_of = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_of == g) for g in range(group_of.max() + 1)]
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if len(set(labels[idx])) < 2:
            continue
        gains.append(roc_auc(labels[idx], after[idx]) - roc_auc(labels[idx], before[idx]))
    if not gains:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(gains, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class SiteFinetuning:
    """What fine-tuning on a site's photos gave: the chosen recipe and epochs, the cross-fitted
    AUC before and after with the gain's interval, whether the gain is clearly positive, and
    (when it is) the site's network (``SITE_MODELS``), with the out-of-fold logits its
    calibration and threshold are to be chosen on."""

    recipe: Recipe
    epochs: int
    auc_before: float
    auc_after: float
    gain_interval: tuple[float, float]
    oof_logits: torch.Tensor
    crossfit: CrossFit
    network: nn.Module | None  # None: the gain is not clearly positive, nothing is served fine-tuned
    site_model: str = "folds"

    @property
    def accepted(self) -> bool:
        return self.network is not None

    @property
    def gain(self) -> float:
        return self.auc_after - self.auc_before


def finetune_for_site(network: nn.Module, spec: PreprocessSpec, images: np.ndarray, labels: np.ndarray,
                      groups: np.ndarray, recipes: list[Recipe], epochs: int, folds: int, device: torch.device,
                      seed: int = 0, resamples: int = 1000, replay: tuple[np.ndarray, np.ndarray] | None = None,
                      replay_share: float = 0.0, site_model: str = "folds") -> SiteFinetuning:
    """Cross-fit every recipe, choose the best (recipe, epochs) by out-of-fold AUC, and build the
    site's network (``site_model``) only when the gain's interval lies above zero (the guard)."""
    if site_model not in SITE_MODELS:
        raise SettingsError(f"site_model must be one of {SITE_MODELS}, got {site_model!r}")
    crossfit = cross_fit(network, spec, images, labels, groups, recipes, epochs, folds, device, seed, replay,
                         replay_share)
    recipe, chosen_epochs = crossfit.best()
    key = (str(recipe), chosen_epochs)
    before = torch.softmax(crossfit.base.float(), 1)[:, 1].numpy()
    after = torch.softmax(crossfit.tuned[key].float(), 1)[:, 1].numpy()
    interval = auc_gain_interval(crossfit.labels, before, after, crossfit.groups, resamples, seed)
    tuned = None
    if interval[0] > 0 and site_model == "folds":
        tuned = fold_models(network, spec, images, labels, groups, recipe, chosen_epochs, folds, device, seed, replay,
                            replay_share)
    elif interval[0] > 0:
        tuned = finetune(network, spec, images, labels, recipe, chosen_epochs, device, seed, replay=replay,
                         replay_share=replay_share)
    return SiteFinetuning(recipe, chosen_epochs, crossfit.auc(), crossfit.auc(key), interval, crossfit.tuned[key],
                          crossfit, tuned, site_model)
