"""One settings object: the CLI's arguments, the MLproject's parameters and the run's params."""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from melanoma.classifier.architectures import architecture
from melanoma.classifier.errors import SettingsError

if TYPE_CHECKING:
    from melanoma.classifier.preprocessing import PreprocessSpec

REGISTERED_MODEL = "melanoma-classifier"
DEFAULT_ALIAS = "champion"
AUGMENTATIONS = ("none", "flip", "color", "style", "full")
BALANCES = ("class", "source", "dro")
OPTIMIZERS = ("adamw", "adam")
PRUNERS = ("median", "none")
OBJECTIVES = ("val_auc", "crossval_mean_auc", "crossval_worst_auc")
THRESHOLD_RULES = ("crossval", "validation")  # melanoma.classifier.decision: the rules a crossval may choose


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field names are the logged MLflow params.

    The defaults are the measured best of docs/results.md: the backbone by the worst held-out
    source across three seeds of ``melanoma crossval``, the rest by validation AUC and
    specificity on external nevi, within 15 minutes of CPU training.
    """

    model: str = "efficientnet_lite1"  # see melanoma.classifier.architectures: cnn, resnet18, efficientnet_lite0, timm:NAME, ...
    data: str = "demo"  # datasets, comma-separated: Kaggle-layout folders or zips, metadata folders, "demo"
    label_map: str = "mel:malignant,nv:benign"  # metadata layout: diagnosis -> class; others left out
    holdout_source: str = ""  # train without this source and report on it (leave-one-source-out)
    balance: str = "class"  # class | source | dro: each class (or each source x class cell) weighs the same; dro: group DRO over the sources
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3  # the classifier head's; the backbone's is lr * backbone_lr_factor
    img_size: int = 96
    channels: int = 3  # 1 = the notebook's grayscale, 3 = RGB
    seed: int = 42
    split_seed: int = -1  # the train/validation split's seed; -1: seed (fixed, seeds vary only the training)
    pretrained: str = "true"  # "true" (ImageNet weights; the notebook's cnn has none), "false", or a weights file
    optimizer: str = "adamw"  # adamw | adam
    weight_decay: float = 0.05  # decoupled (AdamW); norms and biases take none
    warmup_epochs: float = 0.3  # linear warm-up, then cosine decay to zero
    backbone_lr_factor: float = 1.0  # the backbone learns at lr * this (below 1 for pretrained weights)
    freeze_epochs: int = 0  # train only the classifier head for this many epochs first
    label_smoothing: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate (timm models)
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off
    wise_alpha: float = 1.0  # < 1: mix the pretrained backbone back in at the end (WiSE-FT)
    patience: int = 3  # early stopping: epochs without val_auc improvement
    val_fraction: float = 0.15
    augment: str = "flip"  # none | flip | color (flips + colour jitter) | style (flips + colour statistics of another image) | full
    color_constancy: bool = False  # Shades of Gray white balance in preprocessing
    mask_corners: bool = False  # black out everything outside the inscribed circle
    crop_lesion: bool = True  # cut each image to the dark blob in its centre (the lesion) first
    crop_margin: float = 0.2  # skin kept on each side of that blob, as a fraction of its size
    crop_method: str = "largest"  # largest: the largest dark blob; central: by area and nearness to the centre, marker ink left out
    target_sensitivity: float = 0.90  # the operating point is chosen on validation for this
    tta: str = "none"  # test-time views averaged in evaluation and serving: none | flip | dihedral
    calibration: str = "temperature"  # temperature | isotonic | none: fitted on validation, served
    bootstrap: int = 1000  # resamples for the 95 % confidence intervals (0: none)
    external: str = ""  # extra evaluation-only folders, comma-separated
    scope_negatives: str = ""  # a folder of pictures that are out of scope (e.g. skin photos without a dermoscope): the in-scope check also learns a boundary against them
    gradcam_images: int = 8
    demo_size: int = 240  # images per class in the synthetic demo set
    num_threads: int = 0  # torch CPU threads; 0 = torch's default

    def validate(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        arch = architecture(self.model)
        if self.drop_path and arch.library != "timm":
            raise SettingsError(f"drop_path is for timm models; {self.model} has no stochastic depth")
        if self.balance not in BALANCES:
            raise SettingsError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        from melanoma.data.metadata import parse_label_map

        parse_label_map(self.label_map)
        from melanoma.classifier.calibration import METHODS

        if self.calibration not in METHODS:
            raise SettingsError(f"calibration must be one of {METHODS}, got {self.calibration!r}")
        if self.bootstrap < 0:
            raise SettingsError(f"bootstrap must not be negative, got {self.bootstrap}")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.channels not in (1, 3):
            raise SettingsError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        from melanoma.classifier.inference import TTA_VIEWS

        if self.tta not in TTA_VIEWS:
            raise SettingsError(f"tta must be one of {tuple(TTA_VIEWS)}, got {self.tta!r}")
        if self.augment not in AUGMENTATIONS:
            raise SettingsError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.img_size < 32:
            raise SettingsError(f"img_size must be at least 32 pixels, got {self.img_size}")
        for name in ("epochs", "batch_size", "patience", "demo_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "backbone_lr_factor"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "warmup_epochs", "freeze_epochs"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, got {getattr(self, name)}")
        for name, low, high in (("label_smoothing", 0, 0.5), ("drop_path", 0, 0.9), ("ema", 0, 0.99999),
                                ("wise_alpha", 0, 1)):
            if not low <= getattr(self, name) <= high:
                raise SettingsError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        if self.freeze_epochs >= self.epochs:
            raise SettingsError(f"freeze_epochs ({self.freeze_epochs}) must be below epochs ({self.epochs})")
        if self.wise_alpha < 1 and (self.pretrained.lower() == "false" or arch.library == "melanoma"):
            raise SettingsError("wise_alpha < 1 mixes pretrained weights back in: it needs a model with pretrained weights")
        if not 0 <= self.crop_margin <= 2:
            raise SettingsError(f"crop_margin must be in [0, 2] (a fraction of the lesion's size), got {self.crop_margin}")
        from melanoma.classifier.preprocessing import CROP_METHODS

        if self.crop_method not in CROP_METHODS:
            raise SettingsError(f"crop_method must be one of {CROP_METHODS}, got {self.crop_method!r}")
        if self.split_seed < -1:
            raise SettingsError(f"split_seed must be -1 (follow seed) or a seed, got {self.split_seed}")
        if not 0 < self.val_fraction < 1:
            raise SettingsError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.target_sensitivity < 1:
            raise SettingsError(f"target_sensitivity must be in (0, 1), got {self.target_sensitivity}")

    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing these settings train with, and the logged model serves with."""
        from melanoma.classifier.models import input_normalization
        from melanoma.classifier.preprocessing import PreprocessSpec  # here, so the CLI's --help needs no torch

        mean, std = input_normalization(self.model, self.pretrained)
        return PreprocessSpec(img_size=self.img_size, channels=self.channels, color_constancy=self.color_constancy,
                              mask_corners=self.mask_corners, crop_lesion=self.crop_lesion, crop_margin=self.crop_margin,
                              crop_method=self.crop_method, rgb_mean=mean, rgb_std=std)

    @property
    def validation_seed(self) -> int:
        """The seed of the train/validation split: runs that share it (and the data) share
        their validation images, as an ensemble's members must."""
        return self.seed if self.split_seed == -1 else self.split_seed

    @property
    def external_dirs(self) -> list[str]:
        return [p.strip() for p in self.external.split(",") if p.strip()]


@dataclass
class SearchSettings:
    """The search's own settings, beside a TrainConfig: its flags and MLproject's ``search``
    parameters (tests/test_config.py keeps them in step)."""

    n_trials: int = 20  # trials the study should have in total
    continue_on_trial_error: bool = False  # a trial that raises fails the search; true: it is FAILED and the search goes on
    timeout: float = 0.0  # stop starting trials after this many seconds; 0 = no limit
    storage: str = "sqlite:///optuna.db"  # Optuna storage: sqlite:///FILE (one machine) or postgresql://...
    study_name: str = ""  # empty: melanoma-<model>
    registered_model: str = REGISTERED_MODEL
    alias: str = DEFAULT_ALIAS  # moved to the best trial's model
    pruner: str = "median"  # median | none
    params: str = "lr,batch_size"  # the settings searched, comma-separated (melanoma.workflows.search.SEARCH_SPACE)
    objective: str = "val_auc"  # val_auc, or crossval_mean_auc / crossval_worst_auc (a cross-validation per trial)
    heartbeat: int = 60  # seconds between a running trial's heartbeats; silent for 3 of them: retried

    def validate(self) -> None:
        if self.pruner not in PRUNERS:
            raise SettingsError(f"pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.objective not in OBJECTIVES:
            raise SettingsError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.n_trials < 1 or self.heartbeat < 1:
            raise SettingsError(f"n_trials and heartbeat must be positive, got {self.n_trials} and {self.heartbeat}")


@dataclass
class CrossvalSettings:
    """Cross-source validation's own settings, beside a TrainConfig (MLproject's ``crossval``)."""

    threshold_rule: str = "crossval"  # crossval | validation: how the final model's threshold is chosen
    final: bool = True  # also train the model on every source, with that threshold

    def validate(self) -> None:
        if self.threshold_rule not in THRESHOLD_RULES:
            raise SettingsError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")


@dataclass
class AdaptSettings:
    """A site adaptation's settings: the flags of ``melanoma adapt`` and MLproject's ``adapt``."""

    model: str = ""  # the registered (or any logged) model to adapt, e.g. models:/melanoma-classifier@champion
    site: str = ""  # the site's name: the new version's alias is site-<site>
    data: str = ""  # the site's labelled photos, any layout the project reads
    unlabelled: str = ""  # the site's unlabelled photos, for BatchNorm statistics (default: data's photos)
    target_sensitivity: float = 0.90  # the share of the site's melanomas its threshold must find
    min_melanomas: int = 30  # fewer: the model's threshold is kept (the site's is too uncertain)
    force_threshold: bool = False  # use the site's threshold even with fewer than min_melanomas
    recalibrate: bool = False  # refit the model's calibration on the site's labelled photos
    adabn: float = 0.0  # share of the site's BatchNorm statistics (0: the model's, 1: the site's alone)
    adabn_depth: float = 1.0  # the share of the BatchNorm layers adapted, from the input (the rest keep the model's)
    finetune: bool = False  # also fine-tune on the site's labelled photos, judged by cross-fitting (melanoma.finetune)
    recipes: str = "all:1e-4,head:1e-3"  # the fine-tuning recipes cross-fitted: LAYERS:LR, LAYERS all or head
    finetune_epochs: int = 5  # at most; the out-of-fold AUC after each epoch chooses how many
    folds: int = 5  # cross-fitting folds (a patient's or lesion's photos in one)
    replay: float = 0.0  # share of each fine-tuning batch drawn from the training sources' photos (against forgetting)
    site_model: str = "folds"  # served once fine-tuned: the fold models averaged (folds), or one model on all photos (all)
    registered_model: str = REGISTERED_MODEL
    register: bool = True  # register the site version (alias site-<site>)
    bootstrap: int = 1000
    seed: int = 0

    def validate(self) -> None:
        for name in ("model", "site", "data"):
            if not getattr(self, name):
                raise SettingsError(f"adapt needs --{name}")
        if not self.site.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(f"site {self.site!r}: use letters, digits, - and _ (it becomes the alias site-<site>)")
        if not 0 < self.target_sensitivity < 1:
            raise SettingsError(f"target_sensitivity must be in (0, 1), got {self.target_sensitivity}")
        if not 0 <= self.adabn <= 1:
            raise SettingsError(f"adabn must be in [0, 1], got {self.adabn}")
        if not 0 < self.adabn_depth <= 1:
            raise SettingsError(f"adabn_depth must be in (0, 1], got {self.adabn_depth}")
        if self.bootstrap < 0 or self.min_melanomas < 1:
            raise SettingsError("bootstrap must not be negative and min_melanomas must be positive")
        if self.finetune:
            from melanoma.finetune import SITE_MODELS, parse_recipes

            parse_recipes(self.recipes)
            if self.site_model not in SITE_MODELS:
                raise SettingsError(f"site_model must be one of {SITE_MODELS}, got {self.site_model!r}")
            if self.bootstrap < 100:
                raise SettingsError(f"finetune judges its gain by a bootstrap interval: bootstrap must be at least "
                                    f"100, got {self.bootstrap}")
        if self.finetune_epochs < 1 or self.folds < 2:
            raise SettingsError(f"finetune_epochs must be positive and folds at least 2, got {self.finetune_epochs} "
                                f"and {self.folds}")
        if not 0 <= self.replay < 1:
            raise SettingsError(f"replay must be in [0, 1), got {self.replay}")


@dataclass
class EnsembleSettings:
    """An ensemble's settings: the flags of ``melanoma ensemble`` and MLproject's ``ensemble``."""

    runs: str = ""  # the members' training run ids, comma-separated (same data, split and preprocessing)
    tta: str = ""  # test-time views of the ensemble; empty: the members' own (they must agree)
    external: str = ""  # extra evaluation-only folders, comma-separated; empty: the first member's
    bootstrap: int = 1000  # resamples for the 95 % intervals
    registered_model: str = REGISTERED_MODEL
    alias: str = ""  # register the ensemble and move this alias to it (champion, say); empty: log only

    def validate(self) -> None:
        if len(self.run_ids) < 2:
            raise SettingsError(f"an ensemble needs at least two training runs (--runs A,B), got {self.runs!r}")
        if len(set(self.run_ids)) < len(self.run_ids):
            raise SettingsError(f"--runs names a run twice: {self.runs!r}")
        if self.bootstrap < 0:
            raise SettingsError(f"bootstrap must not be negative, got {self.bootstrap}")
        from melanoma.classifier.inference import TTA_VIEWS

        if self.tta and self.tta not in TTA_VIEWS:
            raise SettingsError(f"tta must be one of {tuple(TTA_VIEWS)} (or empty: the members' own), got {self.tta!r}")

    @property
    def run_ids(self) -> list[str]:
        return [r.strip() for r in self.runs.split(",") if r.strip()]


# What runs logged before a setting existed were trained with (the behaviour before it), kept
# apart from today's defaults: changing a default never changes how an old run is read.
LEGACY_SETTINGS = {"split_seed": -1, "holdout_source": "", "balance": "class", "crop_margin": 0.2,
                   "crop_method": "largest", "tta": "none",
                   "calibration": "none", "backbone_lr_factor": 1.0, "freeze_epochs": 0, "label_smoothing": 0.0,
                   "drop_path": 0.0, "ema": 0.0, "wise_alpha": 1.0, "warmup_epochs": 0.0, "weight_decay": 0.0,
                   "optimizer": "adam", "crop_lesion": False, "mask_corners": False, "color_constancy": False,
                   "external": "", "num_threads": 0}


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


def parse_int(text: str | int) -> int:
    """An integer setting; MLproject declares numbers as float, so "5.0" is 5."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


PARSERS = {bool: parse_bool, int: parse_int, float: float, str: str}


def spelling(value: object) -> str:
    """A setting's value as MLproject spells it: booleans lower-case, the rest as ``str``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def settings_params(settings: object) -> dict[str, str]:
    """A settings dataclass's params exactly as ``mlflow run`` logs an entry point's parameters
    (MLproject's spelling, shell-quoted: an empty value is ``''``), so a run started either way
    compares in the UI and ``parse_params`` reads it back."""
    return {f.name: shlex.quote(spelling(getattr(settings, f.name))) for f in fields(settings)}


def unquote(text: str) -> str:
    """A logged param's value as the command received it (``mlflow run`` shell-quotes values;
    runs logged before that did not)."""
    try:
        return " ".join(shlex.split(text))
    except ValueError:  # an unbalanced quote: an old run's raw value
        return text


def same_value(a: str, b: str) -> bool:
    """Whether two spellings of a param mean one value ("1e-3" and "0.001", "False" and "false")."""
    a, b = unquote(str(a)), unquote(str(b))
    if a == b:
        return True
    for parse in (float, parse_bool):
        try:
            x, y = parse(a), parse(b)
        except (ValueError, argparse.ArgumentTypeError):
            continue
        return x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
    return False


def add_config_arguments(parser: argparse.ArgumentParser, defaults: object | None = None) -> None:
    """Add one --flag per field of a settings dataclass (a TrainConfig by default), typed and
    defaulted from it."""
    defaults = defaults or TrainConfig()
    for f in fields(defaults):
        default = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name}", type=PARSERS[type(default)], default=default, help=f"(default: {default})")


def parse_params(params: Mapping[str, object], kind: type = TrainConfig, legacy: Mapping[str, object] | None = None):
    """The settings ``kind`` of a logged run from its params (or any mapping of its fields'
    values), through the CLI's own parsers; a setting the run predates takes its ``legacy``
    value, else its default. Validated."""
    legacy = LEGACY_SETTINGS if legacy is None and kind is TrainConfig else (legacy or {})
    defaults = kind()
    values = {}
    for f in fields(kind):
        default = getattr(defaults, f.name)
        text = unquote(spelling(params[f.name])) if f.name in params else spelling(legacy.get(f.name, default))
        try:
            values[f.name] = PARSERS[type(default)](text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SettingsError(f"setting {f.name}: {exc}") from None
    settings = kind(**values)
    settings.validate()
    return settings


def config_from_args(args: argparse.Namespace, kind: type = TrainConfig):
    """The settings dataclass ``kind`` from parsed arguments, validated."""
    cfg = kind(**{f.name: getattr(args, f.name) for f in fields(kind)})
    cfg.validate()
    return cfg
