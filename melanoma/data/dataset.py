"""Decode a dataset once, cache the uint8 arrays, and split it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from melanoma.classifier.preprocessing import PREPROCESS_VERSION, InvalidImageError, PreprocessSpec, load_for_model
from melanoma.data.layout import discover
from melanoma.data.metadata import IMAGE_EXTENSIONS
from melanoma.data.records import CLASSES, EXPECTED_LAYOUT, DataError, ImageRecord, Source, missing_classes

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where decoded arrays and the demo set live: $MELANOMA_CACHE or ~/.cache/melanoma."""
    return Path(os.environ.get("MELANOMA_CACHE", Path.home() / ".cache" / "melanoma")).expanduser()


@dataclass
class PreparedData:
    """A decoded dataset (or several combined): uint8 images (N, C, H, W) with labels and splits,
    and per image its file, md5, source (collection or site) and group (its lesion or patient)."""

    source: str
    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: list[str]
    md5s: list[str]
    digest: str
    skipped: list[str] = field(default_factory=list)
    sources: np.ndarray | None = None
    groups: np.ndarray | None = None
    locations: np.ndarray | None = None  # the folder or zip each path is relative to
    copies_removed: int = 0  # photos dropped as copies of a photo in another dataset
    copies_within: int = 0  # pairs of copies inside one dataset (kept, in one group)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.sources is None:
            self.sources = np.full(n, Path(self.source).stem)
        if self.groups is None:
            self.groups = np.asarray(self.paths)
        if self.locations is None:
            self.locations = np.full(n, self.source)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def subset(self, idx: np.ndarray) -> "PreparedData":
        """The images at ``idx`` (in memory)."""
        idx = np.asarray(idx)
        return PreparedData(self.source, np.asarray(self.images[idx]), self.labels[idx], self.splits[idx],
                            [self.paths[i] for i in idx], [self.md5s[i] for i in idx], self.digest, self.skipped,
                            self.sources[idx], self.groups[idx], self.locations[idx])

    def class_counts(self, idx: np.ndarray) -> dict[str, int]:
        counts = np.bincount(self.labels[idx], minlength=len(CLASSES))
        return {name: int(c) for name, c in zip(CLASSES, counts)}


def _cache_key(source: Source, spec: PreprocessSpec, require_train: bool, label_map: str) -> str:
    identity = [PREPROCESS_VERSION, str(source.location), spec.image_settings(), require_train, label_map,
                source.fingerprint()]
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
        "sources": [r.source or source.location.stem for r in kept],
        "groups": [r.group or r.path for r in kept],
        "digest": digest.hexdigest()[:16],
        "skipped": skipped,
    }


def prepare_dataset(location: str | Path, spec: PreprocessSpec, require_train: bool = True,
                    use_cache: bool = True, workers: int | None = None, label_map: str = "") -> PreparedData:
    """Discover, decode and resize every image once; later calls with the same files and spec
    load the cached arrays instead (a changed file, size, or setting makes a new cache entry)."""
    source = Source(location)
    try:
        entry = cache_dir() / "arrays" / _cache_key(source, spec, require_train, label_map)
        if use_cache and (entry / "meta.json").exists():
            log.info("loading cached arrays from %s", entry)
            meta = json.loads((entry / "meta.json").read_text())
            # Memory-mapped: opening is instant and pages are read on first use (by the OS, once).
            images = np.load(entry / "images.npy", mmap_mode="r")
        else:
            records = discover(source, require_train=require_train, label_map=label_map)
            decoded = _decode_all(source, records, spec, workers or os.cpu_count() or 1)
            if require_train and not records[0].group:  # the Kaggle layout; one metadata source may hold one class
                _check_train_classes(decoded, source)
            images = decoded.pop("images")
            meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in decoded.items()}
            if use_cache:
                _write_cache(entry, images, meta)
    finally:
        source.close()
    return PreparedData(source=str(source.location), images=images,
                        labels=np.asarray(meta["labels"], dtype=np.int64), splits=np.asarray(meta["splits"]),
                        paths=meta["paths"], md5s=meta["md5s"], digest=meta["digest"], skipped=meta["skipped"],
                        sources=np.asarray(meta["sources"]), groups=np.asarray(meta["groups"]))


def decode_folder(folder: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """Every image file under ``folder`` (a folder or a .zip of pictures, in any layout) as model
    input; unreadable files are skipped and counted."""
    if not Path(folder).exists():
        raise DataError(f"{folder} does not exist: expected a folder (or .zip) of pictures")
    source = Source(folder)
    try:
        files = [f for f in source.files() if PurePosixPath(f).suffix.lower() in IMAGE_EXTENSIONS]
        arrays, skipped = [], 0
        for rel in tqdm(files, desc=f"images in {Path(folder).name}", unit="img", leave=False):
            try:
                arrays.append(load_for_model(source.read(rel), spec))
            except InvalidImageError:
                skipped += 1
    finally:
        source.close()
    if skipped:
        log.warning("%s: %d of %d files could not be decoded and were skipped", folder, skipped, len(files))
    if not arrays:
        raise DataError(f"no readable images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return np.stack(arrays)


def _check_train_classes(decoded: dict, source: Source) -> None:
    for name in missing_classes(np.asarray(decoded["labels"])[np.asarray(decoded["splits"]) == "train"])[:1]:
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


def split_train_val(data: PreparedData, val_fraction: float, seed: int,
                    pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``train`` (or of the indices ``pool``) into train and validation,
    stratified by source and class, that keeps every group on one side: a lesion's or a patient's
    photos, and exact duplicates (same md5), so validation never scores a lesion trained on."""
    train_idx = data.indices("train") if pool is None else np.asarray(pool)
    members = [np.asarray(m) for m in connected_groups(train_idx, data.groups[train_idx],
                                                        np.asarray(data.md5s)[train_idx])]
    strata = [f"{data.sources[m[0]]}:{data.labels[m[0]]}" for m in members]
    counts = Counter(strata)
    strata = [s if counts[s] >= 2 else "rare" for s in strata]  # a stratum needs two groups to be split
    fit_groups, val_groups = train_test_split(np.arange(len(members)), test_size=val_fraction,
                                              stratify=strata, random_state=seed)
    fit = np.sort(np.concatenate([members[g] for g in fit_groups]))
    val = np.sort(np.concatenate([members[g] for g in val_groups]))
    return fit, val


def connected_groups(indices: np.ndarray, *keys: np.ndarray) -> list[list[int]]:
    """``indices`` grouped so that any two sharing a value of any key end up together (union-find)."""
    parent = list(range(len(indices)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in keys:
        first: dict = {}
        for position, value in enumerate(key):
            if value in first:
                parent[root(position)] = root(first[value])
            else:
                first[value] = position
    out: dict[int, list[int]] = {}
    for position, i in enumerate(indices):
        out.setdefault(root(position), []).append(int(i))
    return list(out.values())
