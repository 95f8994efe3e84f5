"""Decode a dataset once, cache the uint8 arrays, and split it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from melanoma.data.layout import CLASSES, EXPECTED_LAYOUT, DataError, ImageRecord, Source, discover
from melanoma.data.preprocessing import PREPROCESS_VERSION, InvalidImageError, PreprocessSpec, load_for_model

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where decoded arrays and the demo set live: $MELANOMA_CACHE or ~/.cache/melanoma."""
    return Path(os.environ.get("MELANOMA_CACHE", Path.home() / ".cache" / "melanoma")).expanduser()


@dataclass
class PreparedData:
    """A decoded dataset: uint8 images (N, C, H, W) with labels and splits, plus provenance."""

    source: str
    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: list[str]
    md5s: list[str]
    digest: str
    skipped: list[str] = field(default_factory=list)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def class_counts(self, idx: np.ndarray) -> dict[str, int]:
        counts = np.bincount(self.labels[idx], minlength=len(CLASSES))
        return {name: int(c) for name, c in zip(CLASSES, counts)}


def _cache_key(source: Source, spec: PreprocessSpec, require_train: bool) -> str:
    identity = [PREPROCESS_VERSION, str(source.location), spec.image_settings(), require_train, source.fingerprint()]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _decode_one(source: Source, record: ImageRecord, spec: PreprocessSpec):
    data = source.read(record.path)
    md5 = hashlib.md5(data).hexdigest()
    try:
        return load_for_model(data, spec), md5, None
    except InvalidImageError as exc:
        return None, md5, str(exc)


def _decode_all(source: Source, records: list[ImageRecord], spec: PreprocessSpec, workers: int) -> dict:
    """Decode every record in parallel threads (OpenCV releases the GIL)."""
    images, kept, md5s, skipped = [], [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda r: _decode_one(source, r, spec), records)
        for record, (array, md5, error) in tqdm(zip(records, results), total=len(records),
                                                desc="decoding images", unit="img"):
            if error is not None:
                log.warning("skipping %s: %s", record.path, error)
                skipped.append(record.path)
                continue
            images.append(array)
            kept.append(record)
            md5s.append(md5)
    if not kept:
        raise DataError(f"none of the {len(records)} files in {source.location} could be decoded as images")
    digest = hashlib.sha256("".join(f"{r.path}\t{r.label}\t{m}\n" for r, m in zip(kept, md5s)).encode())
    return {
        "images": np.stack(images),
        "labels": np.array([r.label for r in kept], dtype=np.int64),
        "splits": np.array([r.split for r in kept]),
        "paths": [r.path for r in kept],
        "md5s": md5s,
        "digest": digest.hexdigest()[:16],
        "skipped": skipped,
    }


def prepare_dataset(location: str | Path, spec: PreprocessSpec, require_train: bool = True,
                    use_cache: bool = True, workers: int | None = None) -> PreparedData:
    """Discover, decode and resize every image once; later calls with the same files and spec
    load the cached arrays instead (a changed file, size, or setting makes a new cache entry)."""
    source = Source(location)
    try:
        entry = cache_dir() / "arrays" / _cache_key(source, spec, require_train)
        if use_cache and (entry / "meta.json").exists():
            log.info("loading cached arrays from %s", entry)
            meta = json.loads((entry / "meta.json").read_text())
            # Memory-mapped: opening is instant and pages are read on first use (by the OS, once).
            images = np.load(entry / "images.npy", mmap_mode="r")
        else:
            records = discover(source, require_train=require_train)
            decoded = _decode_all(source, records, spec, workers or os.cpu_count() or 1)
            if require_train:
                _check_train_classes(decoded, source)
            images = decoded.pop("images")
            meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in decoded.items()}
            if use_cache:
                _write_cache(entry, images, meta)
    finally:
        source.close()
    return PreparedData(source=str(source.location), images=images,
                        labels=np.asarray(meta["labels"], dtype=np.int64), splits=np.asarray(meta["splits"]),
                        paths=meta["paths"], md5s=meta["md5s"], digest=meta["digest"], skipped=meta["skipped"])


def _check_train_classes(decoded: dict, source: Source) -> None:
    for label, name in enumerate(CLASSES):
        if not np.any((decoded["labels"] == label) & (decoded["splits"] == "train")):
            raise DataError(f"class {name!r} has no readable images in train/{name} of {source.location}; "
                            f"{len(decoded['skipped'])} files there or elsewhere could not be decoded. "
                            f"{EXPECTED_LAYOUT}.")


def _write_cache(entry: Path, images: np.ndarray, meta: dict) -> None:
    """Write into a temporary folder and rename it, so an interrupted run leaves no half entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        np.save(tmp / "images.npy", images)
        (tmp / "meta.json").write_text(json.dumps(meta))
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
    except OSError as exc:
        log.warning("could not write the cache at %s: %s", entry, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def split_train_val(data: PreparedData, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``train`` into train and validation, stratified by class.

    Exact duplicates (same md5) stay on one side, so validation never scores an image that
    was also trained on.
    """
    train_idx = data.indices("train")
    groups: dict[str, list[int]] = {}
    for i in train_idx:
        groups.setdefault(data.md5s[i], []).append(int(i))
    members = list(groups.values())
    group_labels = [data.labels[m[0]] for m in members]
    fit_groups, val_groups = train_test_split(np.arange(len(members)), test_size=val_fraction,
                                              stratify=group_labels, random_state=seed)
    fit = np.sort(np.concatenate([members[g] for g in fit_groups]))
    val = np.sort(np.concatenate([members[g] for g in val_groups]))
    return fit, val
