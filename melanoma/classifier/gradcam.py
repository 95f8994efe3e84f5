"""Grad-CAM (Selvaraju et al. 2017), batched, and heat-map overlays on the model input or the photo."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from melanoma.classifier.preprocessing import Region

BOX_COLOUR = (255, 255, 255)


class GradCAM:
    """Class-activation maps for a batch, from one target layer.

    Use as a context manager: the forward hook lives only inside the ``with`` block. The
    gradient is taken with a tensor hook on the layer's output (not a module backward hook,
    which breaks on in-place ReLU), and the model's train/eval mode is restored on exit.

        with GradCAM(model, gradcam_layer(model, img_size)) as cam:
            maps = cam(batch)            # (N, H, W) in [0, 1], for the predicted classes
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module):
        self.model = model
        self.target_layer = target_layer
        self._activations: torch.Tensor | None = None
        self._gradients: torch.Tensor | None = None
        self._handle = None
        self._was_training = model.training

    def __enter__(self) -> "GradCAM":
        self._was_training = self.model.training
        self.model.eval()
        self._handle = self.target_layer.register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activations = self._gradients = None
        self.model.train(self._was_training)

    def _capture(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._activations = output
        output.register_hook(self._store_gradient)

    def _store_gradient(self, grad: torch.Tensor) -> None:
        self._gradients = grad

    def __call__(self, x: torch.Tensor, class_index: int | torch.Tensor | None = None) -> torch.Tensor:
        """Maps (N, H, W) in [0, 1] at the input's resolution, for ``class_index`` (an int, one
        index per image, or None for each image's predicted class)."""
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a `with GradCAM(...) as cam:` block")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = self.model(x)
            if class_index is None:
                class_index = logits.argmax(dim=1)
            index = torch.as_tensor(class_index, device=logits.device).expand(len(x)).view(-1, 1)
            self.model.zero_grad(set_to_none=True)
            logits.gather(1, index).sum().backward()
        weights = self._gradients.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * self._activations).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-8).view(-1, 1, 1)
        return (cam / peak).float()


def ensemble_gradcam(members: list[nn.Module], layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Maps (N, H, W) of one network, or of an ensemble: each member's map for the class that
    the members' averaged logits predict, averaged."""
    predicted = None
    if len(members) > 1:
        with torch.no_grad():
            logits = []
            for member in members:
                was_training = member.training
                logits.append(member.eval()(x).float())
                member.train(was_training)
            predicted = torch.stack(logits).mean(0).argmax(1)
    maps = []
    for member, layer in zip(members, layers):
        with GradCAM(member, layer) as cam:
            maps.append(cam(x, predicted))
    return torch.stack(maps).mean(0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heat map over an RGB or grayscale uint8 image; returns RGB uint8."""
    if image.ndim == 2 or image.shape[-1] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    cam = cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]))
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0, 1)), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)


def fit_longest_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk so its longest side is at most ``max_side`` (never enlarged)."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def overlay_on_photo(photo: np.ndarray, cam: np.ndarray, region: Region, max_side: int = 1024) -> np.ndarray:
    """The heat map over the original photo (longest side capped at ``max_side``): stretched
    over ``region``, the part the model saw, which is outlined; the rest of the photo is left
    as it was. A reader sees where on their own photo the evidence lies."""
    shown = fit_longest_side(photo, max_side).copy()
    x0, y0, x1, y1 = region.pixels(shown.shape)
    shown[y0:y1, x0:x1] = overlay(np.ascontiguousarray(shown[y0:y1, x0:x1]), cam)
    thickness = max(1, round(max(shown.shape[:2]) / 300))
    cv2.rectangle(shown, (x0, y0), (x1 - 1, y1 - 1), BOX_COLOUR, thickness)
    return shown


def side_by_side(photo: np.ndarray, explained: np.ndarray) -> np.ndarray:
    """Original | overlay, the original resized to the overlay's size."""
    photo = cv2.resize(photo, (explained.shape[1], explained.shape[0]), interpolation=cv2.INTER_AREA)
    return np.hstack([photo, explained])
