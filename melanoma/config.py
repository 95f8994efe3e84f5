"""One settings object: the CLI's arguments, the MLproject's parameters and the run's params."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from melanoma.data.preprocessing import PreprocessSpec

MODELS = ("cnn", "resnet18")
AUGMENTATIONS = ("none", "flip", "style", "full")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field names are the logged MLflow params.

    The defaults are the measured best of README's mitigation table (validation AUC and
    specificity on external nevi, within 30 minutes of CPU training).
    """

    model: str = "resnet18"
    data: str = "demo"  # a Kaggle-layout folder, the Kaggle zip, or "demo"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    img_size: int = 64
    channels: int = 3  # 1 = the notebook's grayscale, 3 = RGB
    seed: int = 42
    pretrained: str = "false"  # "true" (torchvision ImageNet weights), "false", or a weights file
    patience: int = 4  # early stopping: epochs without val_auc improvement
    val_fraction: float = 0.15
    augment: str = "flip"  # none | flip | style (flips + colour statistics of another image) | full
    color_constancy: bool = False  # Shades of Gray white balance in preprocessing
    mask_corners: bool = False  # black out everything outside the inscribed circle
    crop_lesion: bool = True  # cut each image to the dark blob in its centre (the lesion) first
    target_sensitivity: float = 0.90  # the operating point is chosen on validation for this
    external: str = ""  # extra evaluation-only folders, comma-separated
    gradcam_images: int = 8
    demo_size: int = 240  # images per class in the synthetic demo set
    num_threads: int = 0  # torch CPU threads; 0 = torch's default

    def validate(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.img_size < 32:
            raise ValueError(f"img_size must be at least 32 pixels, got {self.img_size}")
        for name in ("epochs", "batch_size", "patience", "demo_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.target_sensitivity < 1:
            raise ValueError(f"target_sensitivity must be in (0, 1), got {self.target_sensitivity}")

    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing these settings train with, and the logged model serves with."""
        from melanoma.data.preprocessing import PreprocessSpec  # here, so the CLI's --help needs no torch

        return PreprocessSpec(img_size=self.img_size, channels=self.channels, color_constancy=self.color_constancy,
                              mask_corners=self.mask_corners, crop_lesion=self.crop_lesion)

    @property
    def external_dirs(self) -> list[str]:
        return [p.strip() for p in self.external.split(",") if p.strip()]

    def to_params(self) -> dict[str, str]:
        """Params as MLproject spells them (booleans lower-case), so runs compare in the UI."""
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in dataclasses.asdict(self).items()}


def parse_bool(text: str | bool) -> bool:
    """Parse the spellings of a boolean that MLflow parameters and shells produce."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """Add one --flag per TrainConfig field, typed and defaulted from the dataclass."""
    defaults = defaults or TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = type(default)
        arg_type = parse_bool if kind is bool else kind
        parser.add_argument(f"--{f.name}", type=arg_type, default=default, help=f"(default: {default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    cfg.validate()
    return cfg
