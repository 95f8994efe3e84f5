"""The training loop: batches from cached uint8 arrays, augmentation on tensors, early stopping.

Knows nothing about MLflow: it reports each epoch's metrics through a callback.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from melanoma.data.dataset import prepare_dataset
from melanoma.data.preprocessing import PreprocessSpec, normalize
from melanoma.evaluate import classification_metrics

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type where it pays, else None (fp32): bf16 on CUDA, fp16 on GPUs
    without bf16, bf16 on CPUs with native bf16 units (on AVX2-only CPUs emulated bf16 is
    several times slower than fp32, measured)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device) -> torch.autocast:
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling, on only for fp16 (whose small range lets gradients underflow to zero)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)


# glibc's mallopt parameters and their default values (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_MALLOPT_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is not glibc (macOS, Windows, musl)."""
    try:
        return ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return None


@contextlib.contextmanager
def recycle_freed_memory() -> Iterator[bool]:
    """Within the block, glibc's malloc keeps freed large blocks for reuse; yields whether it could.

    A training step at 224 px allocates and frees activations of about 100 MB each. glibc
    serves every block that large from fresh ``mmap`` pages and returns it on free, so each
    step pays the kernel's page faults again: allocating and filling 103 MB took 83 ms, against
    10 ms for reused memory (measured on this project's 2-core CI machine). With ``mmap`` off and
    trimming raised, freed blocks are recycled; the defaults are restored afterwards.
    """
    mallopt = glibc_mallopt()
    if mallopt is None:
        yield False
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield True
    finally:
        for param, value in GLIBC_MALLOPT_DEFAULTS.items():
            mallopt(param, value)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random augmentation of a float batch in [0, 1], one draw per image, no Python loop.

    ``flip``: horizontal and vertical flips. ``style``: flips, and half the batch takes the
    colour statistics of another image (see ``swap_colour_statistics``). ``full``: any rotation,
    flips, a random resized crop with aspect-ratio jitter (one affine resampling),
    brightness/contrast/saturation jitter, and down-and-up scaling of half the batch (blur, as
    from another camera's optics or resolution). Lesions have no canonical orientation, so
    every rotation is label-preserving.
    """
    if mode == "none":
        return x
    n = len(x)

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).mul_(high - low).add_(low)

    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    if mode in ("flip", "style"):
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
    if mode == "full":
        view = (n, 1, 1, 1)
        brightness = uniform(0.8, 1.2).view(view).to(x)
        contrast = uniform(0.8, 1.2).view(view).to(x)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean * brightness
        if x.shape[1] == 3:
            gray = x.mean(dim=1, keepdim=True)
            x = gray + (x - gray) * uniform(0.8, 1.2).view(view).to(x)
        x = x.clamp_(0, 1)
        x = down_up_scale(x, generator)
    if mode == "style":
        x = swap_colour_statistics(x, generator)
    return x


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


def to_model_input(batch: torch.Tensor, spec: PreprocessSpec, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float on ``device`` in channels-last layout."""
    x = normalize(batch.to(device, non_blocking=True), spec)
    return x.contiguous(memory_format=torch.channels_last)


def make_batch(images: torch.Tensor, labels: torch.Tensor, spec: PreprocessSpec, augment_mode: str,
               generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch -> augmented, normalised model input and labels on ``device``.

    The batch moves as uint8 (a quarter of the bytes) and is augmented where the model runs.
    """
    x = augment(images.to(device, non_blocking=True).float().div_(255), augment_mode, generator)
    return to_model_input(x, spec, device), labels.to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
               y: torch.Tensor, weights: torch.Tensor | None, device: torch.device) -> tuple[float, torch.Tensor]:
    """One optimisation step; returns the loss and the (detached) logits."""
    with autocast(device):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), logits.detach()


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec,
                   device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """Logits (N, 2) for uint8 images (N, C, H, W), in eval mode; the model's mode is restored."""
    was_training = model.training
    if was_training:  # train()/eval() walk every module: 0.4 ms each for ResNet-18 on this CPU
        model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.array(images[start:start + batch_size]))  # a copy: the cache is read-only
        with autocast(device):
            out.append(model(to_model_input(batch, spec, device)).float().cpu())
    if was_training:
        model.train()
    return torch.cat(out) if out else torch.empty(0, 2)


def malignant_probability(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1)[:, 1].numpy()


def evaluate_folder(model: nn.Module, folder: str | Path, spec: PreprocessSpec, threshold: float,
                    device: torch.device) -> tuple[str, dict[str, float]]:
    """The folder's name and the model's metrics on it, at ``threshold``: for evaluation-only
    sets, never for model selection."""
    data = prepare_dataset(folder, spec, require_train=False)
    probs = malignant_probability(predict_logits(model, data.images, spec, device))
    metrics = classification_metrics(data.labels, probs, threshold)
    metrics["count"] = len(data.labels)
    metrics["mean_malignant_probability"] = float(probs.mean())
    return Path(folder).resolve().name, metrics


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                scaler: torch.amp.GradScaler, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                spec: PreprocessSpec, *, batch_size: int, augment_mode: str, generator: torch.Generator,
                device: torch.device, desc: str) -> tuple[float, float]:
    """One shuffled pass over uint8 ``images``, stepping the scheduler per batch; returns the
    mean loss and accuracy on the augmented batches."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total_loss, correct = 0.0, 0
    bar = tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False)
    for start in bar:
        idx = order[start:start + batch_size]
        x, y = make_batch(images[idx], labels[idx], spec, augment_mode, generator, device)
        loss, logits = train_step(model, optimizer, scaler, x, y, weights, device)
        scheduler.step()
        total_loss += loss * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss:.3f}")
    return total_loss / len(images), correct / len(images)


def fit(model: nn.Module, train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
        val_labels: np.ndarray, spec: PreprocessSpec, *, epochs: int, batch_size: int, lr: float,
        augment_mode: str, patience: int, seed: int, device: torch.device,
        on_epoch_end: EpochCallback | None = None) -> FitResult:
    """Train with Adam and a cosine learning-rate schedule, keep the weights of the epoch with
    the best validation AUC (loaded into ``model`` at the end), stop after ``patience`` epochs
    without improvement. ``on_epoch_end(epoch, metrics)`` may raise to stop (e.g. pruning)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).to(memory_format=torch.channels_last)
    images = torch.from_numpy(np.ascontiguousarray(train_images))
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    weights = class_weights(np.asarray(train_labels)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler = grad_scaler(device)
    val_targets = torch.from_numpy(np.asarray(val_labels, dtype=np.int64))

    result = FitResult(best_epoch=0, best_val_auc=-math.inf)
    best_state = copy.deepcopy(model.state_dict())
    with recycle_freed_memory():
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            current_lr = optimizer.param_groups[0]["lr"]
            train_loss, train_accuracy = train_epoch(model, optimizer, scheduler, scaler, images, labels, weights, spec,
                                                     batch_size=batch_size, augment_mode=augment_mode,
                                                     generator=generator, device=device,
                                                     desc=f"epoch {epoch}/{epochs}")
            train_seconds = time.perf_counter() - start

            val_logits = predict_logits(model, val_images, spec, device)
            val_probs = malignant_probability(val_logits)
            val = classification_metrics(val_labels, val_probs)
            metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "val_loss": F.cross_entropy(val_logits, val_targets, weight=weights.cpu()).item(),
                "val_accuracy": val["accuracy"],
                "val_auc": val["auc"],
                "val_sensitivity": val["sensitivity"],
                "val_specificity": val["specificity"],
                "lr": current_lr,
                "train_images_per_s": len(images) / train_seconds,
                "epoch_seconds": time.perf_counter() - start,
            }
            result.history.append(metrics)
            log.info("epoch %d: train_loss %.4f val_accuracy %.4f val_auc %.4f (%.0f img/s)", epoch,
                     metrics["train_loss"], metrics["val_accuracy"], metrics["val_auc"], metrics["train_images_per_s"])
            if metrics["val_auc"] > result.best_val_auc:
                result.best_epoch, result.best_val_auc = epoch, metrics["val_auc"]
                best_state = copy.deepcopy(model.state_dict())
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if epoch - result.best_epoch >= patience:
                log.info("early stop: no val_auc improvement for %d epochs", patience)
                result.stopped_early = True
                break
    model.load_state_dict(best_state)
    return result
