"""Several datasets as one: each photo once, every copy found, every image with its source.

The same photo can arrive twice, e.g. a HAM10000 melanoma at 600x450 (or 200x150) and the same
photo squashed to 300x300 in a Kaggle set. A perceptual hash of the whole frame squashed to a
square (a 256-bit DCT hash) finds such copies whatever their size and aspect ratio; a copy in a
second dataset is dropped, copies inside one dataset are kept in one group so a split cannot
separate them.

Which copy stays (``keeper``): a photo belongs to the collection it was taken in, and the pooled
sets that copy it (the Kaggle melanoma10k holds HAM10000's and ISIC 2017's melanomas) are named
before the collections they copy: the copy of a dataset that records lesions wins, then the
copy of the dataset named later in ``data``. So ``melanoma10k,ham10000,isic2017`` counts the
copies inside melanoma10k as ham10000's and isic2017's photos, in the source x class table, in
per-source metrics and when a source is held out.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import cv2
import numpy as np

from melanoma.classifier.errors import SettingsError
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.data.dataset import PreparedData, prepare_dataset
from melanoma.data.metadata import DEFAULT_LABEL_MAP
from melanoma.data.records import DataError, missing_classes

log = logging.getLogger(__name__)

# The view the hash is taken from: the whole frame, squashed to a square, no crop.
FINGERPRINT_SPEC = PreprocessSpec(img_size=64, channels=3, color_constancy=False, crop_lesion=False)
HASH_SIDE = 16  # 16x16 lowest DCT frequencies: 256 bits
# Hash bits two copies of one photo may differ by (re-encoded, resized, squashed from 4:3). Measured
# on melanoma10k against ham10000 (docs/results.md): its 1,113 HAM10000 melanomas lie 4 (median) to
# 16 bits from their originals, every other photo 36 or more bits from its nearest HAM10000 photo.
COPY_BITS = 16


def parse_datasets(text: str) -> list[tuple[str, str]]:
    """``"a/melanoma10k,ham:/data/ham10000"`` -> [(name, path)]; a name defaults to the folder's."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition(":")
        if sep and re.fullmatch(r"[A-Za-z][\w-]*", name) and len(name) > 1:
            entries.append((name, path))
        else:
            entries.append((Path(item).expanduser().resolve().name, item))
    names = [n for n, _ in entries]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SettingsError(f"two datasets are both named {', '.join(duplicated)}: name them, e.g. clinic_a:/path")
    if not entries:
        raise SettingsError("no dataset given")
    return entries


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """(N, 256) of +1/-1: each image's lowest 16x16 DCT frequencies (of its gray 64x64 square)
    against their median. Two hashes differ in (256 - a . b) / 2 bits."""
    out = np.empty((len(images), HASH_SIDE * HASH_SIDE), np.float32)
    for i, image in enumerate(images):
        gray = image.mean(axis=0) if image.shape[0] == 3 else image[0]
        square = cv2.resize(gray.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
        low = cv2.dct(square)[:HASH_SIDE, :HASH_SIDE].ravel()
        out[i] = np.where(low > np.median(low), 1.0, -1.0)
    return out


def copy_pairs(hashes: np.ndarray, max_bits: int = COPY_BITS, block: int = 2048) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most ``max_bits`` bits."""
    min_dot = hashes.shape[1] - 2 * max_bits
    pairs = []
    for start in range(0, len(hashes), block):
        rows, cols = np.nonzero(hashes[start:start + block] @ hashes.T >= min_dot)
        pairs += [(int(i + start), int(j)) for i, j in zip(rows, cols) if j > i + start]
    return pairs


def fingerprints(location: str | Path, paths: list[str], require_train: bool, label_map: str) -> np.ndarray:
    """Hashes of the images at ``paths`` of one dataset, from its whole-frame view (cached)."""
    view = prepare_dataset(location, FINGERPRINT_SPEC, require_train=require_train, label_map=label_map)
    where = {p: i for i, p in enumerate(view.paths)}
    return perceptual_hashes(view.images[[where[p] for p in paths]])


def load_datasets(text: str, spec: PreprocessSpec, require_train: bool = True, label_map: str = "",
                  locations: dict[str, Path] | None = None) -> PreparedData:
    """Every dataset of ``text`` (see ``parse_datasets``) decoded with ``spec`` and combined:
    sources and groups kept, copies across datasets dropped, copies within one grouped.
    ``locations`` overrides where a named entry lies (the demo set)."""
    parts, hashes = [], []
    for name, path in parse_datasets(text):
        location = (locations or {}).get(path, Path(path))
        data = prepare_dataset(location, spec, require_train=require_train, label_map=label_map)
        if len(set(data.sources)) == 1 and data.sources[0] == Path(data.source).stem:
            data.sources = np.full(len(data.labels), name)  # no source column: the dataset's name
        parts.append((name, data))
        hashes.append(fingerprints(location, data.paths, require_train, label_map))
    combined = concatenate([data for _, data in parts])
    for name in missing_classes(combined.labels[combined.splits == "train"])[:1] if require_train else []:
        raise DataError(f"the training data ({text}) has no {name} images; with a metadata CSV, check the "
                        f"label map {label_map or DEFAULT_LABEL_MAP!r}")
    hashes = np.concatenate(hashes)
    dataset_of = np.concatenate([np.full(len(d.labels), k) for k, (_, d) in enumerate(parts)])
    knows_lesions = [bool(np.any(d.groups != np.asarray(d.paths))) for _, d in parts]

    pairs = copy_pairs(hashes)
    dropped = set()
    within = []
    for i, j in pairs:
        if dataset_of[i] == dataset_of[j]:
            within.append((i, j))
            continue
        kept = keeper(i, j, dataset_of, knows_lesions)
        dropped.add(j if kept == i else i)
    for i, j in within:  # a photo twice in one dataset: one group
        combined.groups[combined.groups == combined.groups[j]] = combined.groups[i]
    kept = np.array([i for i in range(len(combined.labels)) if i not in dropped], dtype=np.int64)
    if dropped:
        log.info("dropped %d photos that are copies of photos in another dataset", len(dropped))
    result = combined.subset(kept) if dropped else combined
    result.copies_removed = len(dropped)
    result.copies_within = len(within)
    return result


def keeper(i: int, j: int, dataset_of: np.ndarray, knows_lesions: list[bool]) -> int:
    """Which of two copies of one photo in two datasets stays: the one of a dataset that records
    lesions, else the one of the dataset named later (pooled sets are named first)."""
    a, b = dataset_of[i], dataset_of[j]
    if knows_lesions[a] != knows_lesions[b]:
        return i if knows_lesions[a] else j
    return i if a > b else j


def concatenate(parts: list[PreparedData]) -> PreparedData:
    """One PreparedData of several; groups are prefixed by source so two datasets' ids never meet."""
    if len(parts) == 1:
        return parts[0]
    digest = hashlib.sha256("".join(p.digest for p in parts).encode()).hexdigest()[:16]
    return PreparedData(
        source=",".join(p.source for p in parts), images=np.concatenate([np.asarray(p.images) for p in parts]),
        labels=np.concatenate([p.labels for p in parts]), splits=np.concatenate([p.splits for p in parts]),
        paths=[path for p in parts for path in p.paths], md5s=[m for p in parts for m in p.md5s], digest=digest,
        skipped=[f"{p.source}/{s}" for p in parts for s in p.skipped],
        sources=np.concatenate([p.sources for p in parts]),
        groups=np.concatenate([np.char.add(f"{k}:", p.groups.astype(str)) for k, p in enumerate(parts)]),
        locations=np.concatenate([p.locations for p in parts]))
