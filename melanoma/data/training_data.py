"""A training run's data: its datasets found, decoded (through the cache) and combined, the
train/validation split, and the images of a held-out source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melanoma.classifier.errors import SettingsError
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.config import TrainConfig
from melanoma.data.combine import load_datasets, parse_datasets
from melanoma.data.dataset import PreparedData, cache_dir, split_train_val
from melanoma.data.demo import demo_dataset


@dataclass
class TrainingData:
    """A run's decoded datasets, its train/validation split, and the held-out source's images."""

    locations: list[Path]
    synthetic: bool
    data: PreparedData
    fit_idx: np.ndarray
    val_idx: np.ndarray
    holdout_idx: np.ndarray


def load_data(cfg: TrainConfig, spec: PreprocessSpec) -> TrainingData:
    """Find, decode (through the cache), combine and split ``cfg.data``; with ``holdout_source``
    that source's images are kept out of training and validation."""
    entries = parse_datasets(cfg.data)
    demo = {"demo": demo_dataset(cfg.demo_size, cfg.seed, cache_dir())}
    data = load_datasets(cfg.data, spec, label_map=cfg.label_map, locations=demo)
    pool, holdout = data.indices("train"), np.empty(0, dtype=np.int64)
    if cfg.holdout_source:
        sources = sorted(set(data.sources))
        if cfg.holdout_source not in sources:
            raise SettingsError(f"holdout_source {cfg.holdout_source!r} is none of the data's sources: {sources}")
        left_out = data.sources == cfg.holdout_source
        holdout, pool = np.flatnonzero(left_out), pool[~left_out[pool]]
        if not len(pool):
            raise SettingsError(f"holding out {cfg.holdout_source!r} leaves nothing to train on")
    fit_idx, val_idx = split_train_val(data, cfg.val_fraction, cfg.validation_seed, pool)
    return TrainingData([demo.get(path, Path(path)) for _, path in entries], "demo" in dict(entries).values(),
                        data, fit_idx, val_idx, holdout)
