"""Running a network on images: device, mixed precision, test-time views, logits and probabilities.

The one inference path that training, evaluation, serving and the experiments share. What is
scored is a ``Scorer``: uint8 images in, logits out, normalisation and test-time augmentation
inside, so PyTorch and the exported ONNX graph (``melanoma.classifier.engine``) compute the same function.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from melanoma.classifier.calibration import Calibration
from melanoma.classifier.errors import SettingsError
from melanoma.classifier.preprocessing import PreprocessSpec, normalization, normalize
from melanoma.classifier.scope import ScopeModel, colourfulness, logits_and_features


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def to_model_input(batch: torch.Tensor, spec: PreprocessSpec, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W), or floats in [0, 1] -> normalised float on ``device``, channels-last
    (oneDNN's fast layout: the notebook configuration trains 1.9x as fast in it; ``melanoma bench
    --tricks``)."""
    x = normalize(batch.to(device, non_blocking=True), *normalization(spec, device))
    return x.contiguous(memory_format=torch.channels_last)


# Test-time views of a lesion, which has no canonical orientation. ``flip``: the 4 flips (the
# views a flip-trained model has seen); ``dihedral``: also their transposes, all 8 symmetries of
# the square (for models trained with rotations: transposes a model never saw make it worse).
TTA_VIEWS = {"none": 1, "flip": 4, "dihedral": 8}


def test_time_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a batch (N, C, H, W) that ``tta`` averages over, the batch itself first."""
    if tta == "none":
        return [x]
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]
    return flips if tta == "flip" else flips + [v.transpose(-2, -1) for v in flips]


class Scorer(nn.Module):
    """What the served model computes: uint8 images (N, C, H, W) -> logits (N, 2), normalised
    inside, averaged over test-time views and over ensemble members. The views of a batch go
    through each network as one batch. With a ``scope`` model (one network only) it returns the
    logits and the scope score of each photo's own view (``melanoma.classifier.scope``)."""

    def __init__(self, members: nn.Module | list[nn.Module], spec: PreprocessSpec, tta: str = "none",
                 scope: ScopeModel | None = None):
        """``members``: one network, or an ensemble's (a list or ``nn.ModuleList``)."""
        super().__init__()
        if tta not in TTA_VIEWS:
            raise SettingsError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")
        self.members = nn.ModuleList(members if isinstance(members, (list, tuple, nn.ModuleList)) else [members])
        if scope is not None and len(self.members) > 1:
            raise SettingsError("an in-scope check belongs to one network; an ensemble's members each have their own")
        self.tta, self.scope = tta, scope
        mean, std = normalization(spec)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = normalize(images, self.mean, self.std)
        views = test_time_views(x, self.tta)
        x = torch.cat(views).contiguous(memory_format=torch.channels_last)
        if self.scope is None:
            logits = torch.stack([member(x).float() for member in self.members]).mean(0)
            return logits.view(len(views), -1, logits.shape[-1]).mean(0)
        logits, features = logits_and_features(self.members[0], x)
        score = self.scope(features[:images.shape[0]], colourfulness(images))  # the photo's own view
        return logits.float().view(len(views), -1, logits.shape[-1]).mean(0), score


@torch.inference_mode()
def predict_outputs(model: nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec | None,
                    device: torch.device, batch_size: int = 128,
                    tta: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, 2) for uint8 images (N, C, H, W), in eval mode, averaged over the ``tta``
    views, and the scope scores (N,) where the scorer has a scope model (else None); a
    ``Scorer`` is used as it is (``spec`` and ``tta`` unused). The model's mode is restored."""
    scorer = model if isinstance(model, Scorer) else Scorer(model, spec, tta).to(device)
    was_training = model.training
    if was_training:  # train()/eval() walk every module: skip it when the mode is already right
        scorer.eval()
    logits, scores = [], []
    batch_size = max(1, batch_size // TTA_VIEWS[scorer.tta])
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.array(images[start:start + batch_size]))  # a copy: the cache is read-only
        with autocast(device):
            result = scorer(batch.to(device, non_blocking=True))
        if isinstance(result, tuple):
            result, score = result
            scores.append(score.float().cpu())
        logits.append(result.float().cpu())
    if was_training:
        model.train()
    return (torch.cat(logits) if logits else torch.empty(0, 2)), (torch.cat(scores) if scores else None)


@torch.inference_mode()
def scope_features(network: nn.Module, images: np.ndarray, spec: PreprocessSpec, device: torch.device,
                         batch_size: int = 128) -> np.ndarray:
    """The statistics the in-scope check reads (N, D) of uint8 images, in eval mode (fp32)."""
    was_training = network.training
    network.eval()
    mean, std = normalization(spec, device)
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(torch.as_tensor(np.array(images[start:start + batch_size])).to(device), mean, std)
        out.append(logits_and_features(network, x.contiguous(memory_format=torch.channels_last))[1].float().cpu())
    network.train(was_training)
    return torch.cat(out).numpy()


def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec | None,
                   device: torch.device, batch_size: int = 128, tta: str = "none") -> torch.Tensor:
    """Logits (N, 2) for uint8 images (N, C, H, W): ``predict_outputs`` without the scope."""
    return predict_outputs(model, images, spec, device, batch_size, tta)[0]


def predict_proba(model: nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec, device: torch.device,
                  calibration: Calibration = Calibration(), tta: str = "none") -> np.ndarray:
    """Malignant probability of each uint8 image (N, C, H, W), calibrated by ``calibration``."""
    return calibration.probabilities(predict_logits(model, images, spec, device, tta=tta))
