"""The training loop: batches from cached uint8 arrays, augmentation on tensors, a fine-tuning
recipe, early stopping.

Knows nothing about MLflow: it reports each epoch's metrics through a callback.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from melanoma import metric_names as names
from melanoma.classifier.calibration import Calibration
from melanoma.classifier.inference import amp_dtype, autocast, predict_logits, to_model_input
from melanoma.classifier.models import classifier_head
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.config import TrainConfig
from melanoma.data.training_data import TrainingData
from melanoma.evaluate import classification_metrics
from melanoma.memory import recycle_freed_memory

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[dict], None]
DRO_STEP = 0.01  # group DRO's step for the sources' weights, the value of Sagawa et al. (2020)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling, on only for fp16 (whose small range lets gradients underflow to zero)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random augmentation of a float batch in [0, 1], one draw per image, no Python loop.

    ``flip``: horizontal and vertical flips. ``color``: flips and ``jitter_colour``.
    ``style``: flips, and half the batch takes the colour statistics of another image (see
    ``swap_colour_statistics``). ``full``: any rotation, flips, a random resized crop with
    aspect-ratio jitter (one affine resampling), ``jitter_colour``, and down-and-up scaling of
    half the batch (blur, as from another camera's optics or resolution). Lesions have no
    canonical orientation, so every rotation is label-preserving.
    """
    if mode == "none":
        return x
    n = len(x)

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).mul_(high - low).add_(low)

    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    if mode in ("flip", "color", "style"):
        angle, scale, aspect = torch.zeros(n), torch.ones(n), torch.ones(n)
        shift = torch.zeros(n, 2)
    else:
        angle = uniform(0, 2 * math.pi)
        scale = uniform(0.75, 1.0)  # side of the crop relative to the image
        aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)
    sx, sy = scale * aspect.sqrt() * flip_x, scale / aspect.sqrt() * flip_y
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, shift[:, 0]], 1),
                         torch.stack([sin * sx, cos * sy, shift[:, 1]], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if mode in ("color", "full"):
        x = jitter_colour(x, generator)
    if mode == "full":
        x = down_up_scale(x, generator)
    if mode == "style":
        x = swap_colour_statistics(x, generator)
    return x


def jitter_colour(x: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Scale each image's brightness, contrast and (RGB) saturation by a random factor in
    1 +- ``strength``, as another camera, light or white balance would."""
    view = (len(x), 1, 1, 1)

    def factor() -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(len(x), generator=generator) - 1)).view(view).to(x)

    brightness, contrast = factor(), factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean * brightness
    if x.shape[1] == 3:
        gray = x.mean(dim=1, keepdim=True)
        x = gray + (x - gray) * factor()
    return x.clamp_(0, 1)


def swap_colour_statistics(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Give a random share ``p`` of the batch the per-channel mean and standard deviation of
    another image in the batch (Reinhard-style colour transfer).

    In melanoma10k the photo source, and with it brightness and colour cast, predicts the class;
    after the swap an image's global colour statistics say nothing about its label. Measured on
    melanoma10k (README, run F) it made external nevi look more malignant, not less: colour is
    evidence there, not only shortcut.
    """
    n = len(x)
    partner = torch.randperm(n, generator=generator)
    chosen = (torch.rand(n, generator=generator) < p).view(n, 1, 1, 1).to(x.device)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    swapped = ((x - mean) / std * std[partner] + mean[partner]).clamp_(0, 1)
    return torch.where(chosen, swapped, x)


def down_up_scale(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Resample a random half of the batch to 40-100% of its size and back (one factor per batch)."""
    chosen = torch.rand(len(x), generator=generator) < p
    factor = 0.4 + 0.6 * torch.rand(1, generator=generator).item()
    size = x.shape[-2:]
    small = [max(4, int(s * factor)) for s in size]
    if chosen.any() and small != list(size):
        low = F.interpolate(x[chosen], size=small, mode="bilinear", antialias=True, align_corners=False)
        x[chosen] = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return x


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights, so both classes count equally in the loss (no images dropped)."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.tensor(len(labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


def sample_weights(labels: np.ndarray, sources: np.ndarray | None = None) -> torch.Tensor:
    """A loss weight per image so that every class (or, with ``sources``, every source x class
    cell) weighs the same in total: a source that holds one class cannot outweigh the others."""
    cells = np.asarray(labels).astype(str) if sources is None else np.char.add(np.asarray(sources).astype(str),
                                                                               np.asarray(labels).astype(str))
    _, cell, counts = np.unique(cells, return_inverse=True, return_counts=True)
    return torch.tensor(len(cells) / (len(counts) * counts[cell]), dtype=torch.float32)


def weighted_mean(weights: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch loss as the ``weights``-weighted mean of the per-image losses."""
    return lambda losses: (losses * weights).sum() / weights.sum()


class SourceObjective:
    """The batch loss from per-image losses, and each training source's loss over the epoch.

    With ``dro`` it is group DRO over the sources (Sagawa et al. 2020, "Distributionally robust
    neural networks"): each source keeps a weight that grows with exp(``step`` x its loss), and the
    batch loss is the weighted mean of the sources' losses, so the source the model fits worst
    steers training. Otherwise it is the weighted mean over the batch. Within a source each image
    keeps its ``sample_weights`` weight (``balance=dro`` balances the classes inside each source).
    """

    def __init__(self, sources: np.ndarray, image_weights: torch.Tensor, dro: bool, step: float = DRO_STEP):
        self.names, codes = np.unique(np.asarray(sources).astype(str), return_inverse=True)
        self.codes = torch.from_numpy(codes.astype(np.int64))
        self.image_weights, self.dro, self.step = image_weights, dro, step
        self.source_weights = torch.full((len(self.names),), 1 / len(self.names), dtype=torch.float64)
        self.loss_sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.weight_sums = torch.zeros(len(self.names), dtype=torch.float64)

    def for_batch(self, idx: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss function of the batch of images ``idx``."""
        groups, weights = self.codes[idx].to(device), self.image_weights[idx].to(device)

        def batch_loss(losses: torch.Tensor) -> torch.Tensor:
            sums = torch.zeros(len(self.names), device=device).index_add(0, groups, losses * weights)
            totals = torch.zeros(len(self.names), device=device).index_add(0, groups, weights)
            self.loss_sums += sums.detach().double().cpu()
            self.weight_sums += totals.double().cpu()
            if not self.dro:
                return sums.sum() / totals.sum()
            present = (totals > 0).cpu()
            source_losses = sums / totals.clamp_min(torch.finfo(totals.dtype).tiny)
            updated = self.source_weights * torch.exp(self.step * source_losses.detach().double().cpu() * present)
            self.source_weights = updated / updated.sum()
            q = (self.source_weights * present).to(device, torch.float32)
            return (q * source_losses).sum() / q.sum()
        return batch_loss

    def epoch_metrics(self) -> dict[str, float]:
        """Each source's mean training loss since the last call (and its DRO weight); nothing for
        a single source, whose loss is ``train_loss``."""
        metrics = {}
        if len(self.names) > 1:
            losses = self.loss_sums / self.weight_sums.clamp_min(torch.finfo(torch.float64).tiny)
            metrics = {names.TRAIN_LOSS_SOURCE.format(n): float(v) for n, v in zip(self.names, losses)}
            if self.dro:
                metrics |= {names.DRO_WEIGHT.format(n): float(q) for n, q in zip(self.names, self.source_weights)}
        self.loss_sums.zero_()
        self.weight_sums.zero_()
        return metrics

    def state_dict(self) -> dict:
        return {"source_weights": self.source_weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.source_weights = state["source_weights"].clone()


def make_batch(images: torch.Tensor, labels: torch.Tensor, spec: PreprocessSpec, augment_mode: str,
               generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch -> augmented, normalised model input and labels on ``device``.

    The batch moves as uint8 (a quarter of the bytes) and is augmented where the model runs.
    """
    x = augment(images.to(device, non_blocking=True).float().div_(255), augment_mode, generator)
    return to_model_input(x, spec, device), labels.to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
               y: torch.Tensor, batch_loss: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device,
               label_smoothing: float = 0.0) -> tuple[float, torch.Tensor]:
    """One optimisation step (loss: ``batch_loss`` of the per-image losses, their mean without
    it); returns the loss and the (detached) logits."""
    with autocast(device):
        logits = model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=label_smoothing)
        loss = losses.mean() if batch_loss is None else batch_loss(losses)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), logits.detach()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with two parameter groups: the classifier head at ``lr``, the backbone at
    ``lr * backbone_lr_factor``. Norms and biases take no weight decay."""
    head = {id(p) for p in classifier_head(model).parameters()}
    groups = {(part, decay): [] for part in ("backbone", "head") for decay in (True, False)}
    for p in model.parameters():
        groups[("head" if id(p) in head else "backbone", p.ndim > 1)].append(p)
    factor = {"backbone": cfg.backbone_lr_factor, "head": 1.0}
    params = [{"params": ps, "lr": cfg.lr * factor[part], "weight_decay": cfg.weight_decay if decay else 0.0,
               "name": part} for (part, decay), ps in groups.items() if ps]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.lr)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    head = {id(p) for p in classifier_head(model).parameters()}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)


def interpolate_weights(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor], alpha: float,
                        head_keys: set[str]) -> dict[str, torch.Tensor]:
    """Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): ``alpha`` of the fine-tuned
    backbone plus ``1 - alpha`` of the pretrained one; the new head keeps its trained weights."""
    return {k: v if k in head_keys or not v.is_floating_point() else alpha * v + (1 - alpha) * initial[k].to(v)
            for k, v in final.items()}


def fit_data(model: nn.Module, data: TrainingData, spec: PreprocessSpec, cfg: TrainConfig, device: torch.device,
             on_epoch_end: EpochCallback | None = None, on_checkpoint: CheckpointCallback | None = None,
             resume: dict | None = None) -> FitResult:
    """``fit`` on a run's own split."""
    d, fit_idx, val_idx = data.data, data.fit_idx, data.val_idx
    return fit(model, d.images[fit_idx], d.labels[fit_idx], d.images[val_idx], d.labels[val_idx], spec, cfg, device,
               on_epoch_end, train_sources=d.sources[fit_idx], on_checkpoint=on_checkpoint, resume=resume)


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def train_epoch(state: TrainingState, images: torch.Tensor, labels: torch.Tensor, spec: PreprocessSpec,
                device: torch.device, desc: str) -> tuple[float, float]:
    """One shuffled pass over uint8 ``images``, stepping the scheduler (and the EMA) per batch;
    returns the mean loss and accuracy on the augmented batches."""
    cfg = state.cfg
    state.model.train()
    order = torch.randperm(len(images), generator=state.generator)
    total_loss, correct = 0.0, 0
    bar = tqdm(range(0, len(images), cfg.batch_size), desc=desc, unit="batch", leave=False)
    for start in bar:
        idx = order[start:start + cfg.batch_size]
        x, y = make_batch(images[idx], labels[idx], spec, cfg.augment, state.generator, device)
        loss, logits = train_step(state.model, state.optimizer, state.scaler, x, y,
                                  state.objective.for_batch(idx, device), device, cfg.label_smoothing)
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        total_loss += loss * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss:.3f}")
    return total_loss / len(images), correct / len(images)


class TrainingState:
    """Everything the loop carries from epoch to epoch: the model, optimiser, schedule, loss
    scaler, weight EMA, the sources' DRO weights, the batch generator's RNG, early-stopping
    bookkeeping and history. Saved
    and restored as one state dict (as torchvision's references and timm keep theirs), so a
    resumed run repeats the uninterrupted one exactly."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device,
                 objective: SourceObjective):
        self.model, self.cfg, self.objective = model, cfg, objective
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)))
        self.scaler = grad_scaler(device)
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.initial = copy.deepcopy(model.state_dict()) if cfg.wise_alpha < 1 else None
        self.epoch = 0
        self.result = FitResult(best_epoch=0, best_val_auc=-math.inf)
        self.best_state = copy.deepcopy(self.evaluated.state_dict())

    @property
    def evaluated(self) -> nn.Module:
        """The weights validated and kept: the moving average with ``ema``, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def record(self, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch's metrics; the evaluated weights are kept when validation AUC improved."""
        self.epoch = epoch
        self.result.history.append(metrics)
        if metrics["val_auc"] > self.result.best_val_auc:
            self.result.best_epoch, self.result.best_val_auc = epoch, metrics["val_auc"]
            self.best_state = copy.deepcopy(self.evaluated.state_dict())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "objective": self.objective.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "initial": self.initial, "best_epoch": self.result.best_epoch,
                "best_val_auc": self.result.best_val_auc, "history": self.result.history,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.objective.load_state_dict(state["objective"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.initial, self.epoch, self.best_state = state["initial"], state["epoch"], state["best_state"]
        self.result = FitResult(state["best_epoch"], state["best_val_auc"], list(state["history"]))

    def finish(self) -> FitResult:
        """Load the kept weights into the model (mixed back towards the pretrained ones with
        ``wise_alpha`` < 1) and return the result."""
        set_backbone_trainable(self.model, True)
        best = self.best_state
        if self.initial is not None:
            head = classifier_head(self.model)
            head_keys = {f"{name}.{k}" for name, m in self.model.named_modules() if m is head for k in m.state_dict()}
            best = interpolate_weights(self.initial, best, self.cfg.wise_alpha, head_keys)
        self.model.load_state_dict(best)
        return self.result


def validate_epoch(model: nn.Module, images: np.ndarray, labels: np.ndarray, loss_weights: torch.Tensor,
                   spec: PreprocessSpec, device: torch.device) -> dict[str, float]:
    """Validation figures at 0.5, on the raw (uncalibrated) probabilities."""
    logits = predict_logits(model, images, spec, device)
    val = classification_metrics(labels, Calibration().probabilities(logits))
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return {"val_auc": val["auc"], "val_loss": F.cross_entropy(logits, targets, weight=loss_weights).item(),
            "val_accuracy": val["accuracy"], "val_sensitivity": val["sensitivity"],
            "val_specificity": val["specificity"]}


def fit(model: nn.Module, train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
        val_labels: np.ndarray, spec: PreprocessSpec, cfg: TrainConfig, device: torch.device,
        on_epoch_end: EpochCallback | None = None, train_sources: np.ndarray | None = None,
        on_checkpoint: CheckpointCallback | None = None, resume: dict | None = None) -> FitResult:
    """Train with ``cfg``'s recipe, keep the weights of the epoch with the best validation AUC
    (loaded into ``model`` at the end), stop after ``patience`` epochs without improvement.

    Each image's loss weight balances the classes (``balance=class``) or the source x class
    cells (``balance=source``, with ``train_sources``); ``balance=dro`` adds group DRO over the
    sources (``SourceObjective``). Each source's training loss is in the epoch's metrics. ``on_epoch_end(epoch, metrics)`` may
    raise to stop (e.g. pruning). After each epoch ``on_checkpoint`` gets the whole
    ``TrainingState.state_dict()``; ``fit(..., resume=state)`` continues from it exactly.
    """
    torch.manual_seed(cfg.seed)
    model.to(device).to(memory_format=torch.channels_last)
    images = torch.from_numpy(np.ascontiguousarray(train_images))
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    sources = np.zeros(len(train_labels), dtype=int) if train_sources is None else train_sources
    weights = sample_weights(train_labels, sources if cfg.balance in ("source", "dro") else None)
    objective = SourceObjective(sources, weights, dro=cfg.balance == "dro")
    val_weights = class_weights(np.asarray(train_labels))
    state = TrainingState(model, cfg, math.ceil(len(images) / cfg.batch_size), device, objective)
    if resume is not None:
        state.load_state_dict(resume)
        log.info("resuming after epoch %d of %d", state.epoch, cfg.epochs)
    with recycle_freed_memory():
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            start = time.perf_counter()
            set_backbone_trainable(model, epoch > cfg.freeze_epochs)
            current_lr = max(g["lr"] for g in state.optimizer.param_groups)
            train_loss, train_accuracy = train_epoch(state, images, labels, spec, device, f"epoch {epoch}/{cfg.epochs}")
            train_seconds = time.perf_counter() - start
            val = validate_epoch(state.evaluated, val_images, val_labels, val_weights, spec, device)
            metrics = {"val_auc": val.pop("val_auc"),  # the objective first: the MLflow UI plots the first metric first
                       "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy, **val,
                       **state.objective.epoch_metrics(), "lr": current_lr, "train_images_per_s": len(images) / train_seconds,
                       "epoch_seconds": time.perf_counter() - start}
            state.record(epoch, metrics)
            log.info("epoch %d: train_loss %.4f val_accuracy %.4f val_auc %.4f (%.0f img/s)", epoch, train_loss,
                     metrics["val_accuracy"], metrics["val_auc"], metrics["train_images_per_s"])
            if on_checkpoint is not None:
                on_checkpoint(state.state_dict())
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if epoch - state.result.best_epoch >= cfg.patience:
                log.info("early stop: no val_auc improvement for %d epochs", cfg.patience)
                state.result.stopped_early = True
                break
    return state.finish()
