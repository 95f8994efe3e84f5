"""The two classifiers, ImageNet weight loading, and each model's Grad-CAM target layer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from melanoma.conv import Conv3x3

log = logging.getLogger(__name__)

NUM_CLASSES = 2


class NotebookCNN(nn.Module):
    """The Kaggle notebook's CNN: three conv blocks (32/64/128, BatchNorm, ReLU, max-pool),
    global average pooling, fc 256, dropout 0.5, fc 2.

    Each block applies max-pool before ReLU: the two commute exactly (ReLU is monotone), so the
    function and its gradients are the notebook's, but ReLU runs on a quarter of the values.
    The convolutions are ``Conv3x3``: ``nn.Conv2d(cin, cout, 3, padding=1)`` with a faster
    weight gradient on the CPU.
    """

    def __init__(self, channels: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(Conv3x3(cin, cout), nn.BatchNorm2d(cout),
                                 nn.MaxPool2d(2), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 256), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but cannot be had."""


def imagenet_resnet18_state(pretrained: str) -> dict[str, torch.Tensor]:
    """ImageNet ResNet-18 weights: from a local file, or torchvision's cache/download.

    torchvision keeps downloads in $TORCH_HOME/hub/checkpoints; a file there is used offline.
    """
    if pretrained.lower() != "true":
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained weights file {path} does not exist "
                                         "(use pretrained=true for torchvision's ImageNet weights)")
        return torch.load(path, map_location="cpu", weights_only=True)
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not available"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PretrainedWeightsError(
            f"could not download the ImageNet ResNet-18 weights ({exc}). Offline, put the file "
            f"{Path(weights.url).name} at {cache} (or set TORCH_HOME), or pass pretrained=/path/to/weights.pth"
        ) from exc


def fold_conv1(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Adapt RGB conv1 filters (out, 3, k, k) to ``channels`` inputs.

    For grayscale the RGB filters are summed: a gray image g fed as (g, g, g) to the RGB filter
    gives exactly the response of the summed filter on g, so nothing learned is discarded.
    """
    if channels == 3:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def build_resnet18(channels: int = 3, pretrained: str = "false") -> nn.Module:
    model = resnet18(weights=None)
    if pretrained.lower() != "false":
        state = imagenet_resnet18_state(pretrained)
        state["conv1.weight"] = fold_conv1(state["conv1.weight"], channels)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        missing, _ = model.load_state_dict(state, strict=False)
        if set(missing) - {"fc.weight", "fc.bias"}:
            raise PretrainedWeightsError(f"weights file lacks ResNet-18 layers: {sorted(missing)[:5]}")
        log.info("loaded ImageNet weights into ResNet-18 (%d input channels)", channels)
    else:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    return model


def build_model(name: str, channels: int, pretrained: str = "false") -> nn.Module:
    """``cnn`` (the notebook's) or ``resnet18``, with ``channels`` inputs and 2 outputs."""
    if name == "cnn":
        if pretrained.lower() != "false":
            raise ValueError("pretrained weights exist only for resnet18; use pretrained=false with cnn")
        return NotebookCNN(channels)
    if name == "resnet18":
        return build_resnet18(channels, pretrained)
    raise ValueError(f"unknown model {name!r}; choose cnn or resnet18")


# Grad-CAM's map has the target layer's resolution: below 4 pixels across it says only which
# quadrant mattered (ResNet-18's last stage is 2x2 for 64 px inputs).
MIN_GRADCAM_CELLS = 4


def gradcam_layer(model: nn.Module, img_size: int) -> nn.Module:
    """The deepest convolutional stage (the most class-specific) whose map is at least
    ``MIN_GRADCAM_CELLS`` pixels across for ``img_size`` inputs."""
    if isinstance(model, NotebookCNN):
        return model.features[-1]
    if hasattr(model, "layer4"):  # torchvision ResNet: stages 1-4 at strides 4, 8, 16, 32
        for stage, stride in ((model.layer4, 32), (model.layer3, 16), (model.layer2, 8)):
            if img_size // stride >= MIN_GRADCAM_CELLS:
                return stage
        return model.layer1
    raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")
