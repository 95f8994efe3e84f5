"""Running a network on images: device, mixed precision, logits and probabilities.

The one inference path that training, evaluation, serving and the experiments share.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from melanoma.calibration import Calibration
from melanoma.data.preprocessing import PreprocessSpec, normalize


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
    x = normalize(batch.to(device, non_blocking=True), spec)
    return x.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec,
                   device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """Logits (N, 2) for uint8 images (N, C, H, W), in eval mode; the model's mode is restored."""
    was_training = model.training
    if was_training:  # train()/eval() walk every module: skip it when the mode is already right
        model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.array(images[start:start + batch_size]))  # a copy: the cache is read-only
        with autocast(device):
            out.append(model(to_model_input(batch, spec, device)).float().cpu())
    if was_training:
        model.train()
    return torch.cat(out) if out else torch.empty(0, 2)


def predict_proba(model: nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec, device: torch.device,
                  calibration: Calibration = Calibration()) -> np.ndarray:
    """Malignant probability of each uint8 image (N, C, H, W), calibrated by ``calibration``."""
    return calibration.probabilities(predict_logits(model, images, spec, device))
