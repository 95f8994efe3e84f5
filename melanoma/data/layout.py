"""Finding the images: a folder or a zip in the Kaggle layout, a folder of images with a metadata
CSV (HAM10000, ISIC archive exports), or a plain class folder."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from melanoma.data.metadata import discover_metadata, find_metadata_csv
from melanoma.data.records import CLASSES, EXPECTED_LAYOUT, DataError, ImageRecord, Source

SPLITS = ("train", "test")
EVAL_LAYOUT = (
    "Expected <root>/benign/ and/or <root>/malignant/ image folders, the Kaggle layout, "
    "or a single folder named benign or malignant"
)


def _class_dirs(files: list[str]) -> dict[PurePosixPath, list[str]]:
    """Group files by their parent folder."""
    groups: dict[PurePosixPath, list[str]] = {}
    for rel in files:
        groups.setdefault(PurePosixPath(rel).parent, []).append(rel)
    return groups


def _find_train_root(groups: dict[PurePosixPath, list[str]]) -> PurePosixPath | None:
    """The shallowest folder X with X/train/<class>/ under it (the zip nests one level)."""
    roots = {d.parent.parent for d in groups if d.name in CLASSES and d.parent.name == "train"}
    return min(roots, key=lambda p: len(p.parts)) if roots else None


def discover(source: Source, require_train: bool = True, label_map: str = "") -> list[ImageRecord]:
    """List the labelled files of a dataset.

    A folder with a metadata CSV (``image_id`` and ``dx`` columns) is read with ``label_map``
    (see ``melanoma.data.metadata``). Otherwise training needs the Kaggle layout (``train/``
    required, ``test/`` optional). With
    ``require_train=False`` (evaluation) a folder of ``benign/`` and/or ``malignant/``, or a
    single folder named after a class, is accepted too; such records get split ``"eval"``.
    """
    files = source.files()
    csv = find_metadata_csv(source, files)
    if csv is not None:
        return discover_metadata(source, files, csv, label_map, split="train" if require_train else "eval")
    groups = _class_dirs(files)
    root = _find_train_root(groups)
    records: list[ImageRecord] = []
    if root is not None:
        for split in SPLITS:
            for label, name in enumerate(CLASSES):
                records += [ImageRecord(f, label, split) for f in groups.get(root / split / name, [])]
        for label, name in enumerate(CLASSES):
            if not groups.get(root / "train" / name):
                raise DataError(f"class {name!r} has no images in {source.location / root / 'train' / name}. "
                                f"{EXPECTED_LAYOUT}.")
        return records
    if require_train:
        raise DataError(f"no train/benign and train/malignant folders found in {source.location}. "
                        f"{EXPECTED_LAYOUT}.")
    for label, name in enumerate(CLASSES):
        records += [ImageRecord(f, label, "eval") for d, fs in groups.items() if d.name == name for f in fs]
    if not records and source.location.name in CLASSES:
        label = CLASSES.index(source.location.name)
        records = [ImageRecord(f, label, "eval") for f in groups.get(PurePosixPath("."), [])]
    if not records:
        raise DataError(f"no images found in {source.location}. {EVAL_LAYOUT}.")
    return records


def read_file(location: str | Path, rel: str) -> bytes:
    """One file's bytes from a dataset folder or zip."""
    source = Source(location)
    try:
        return source.read(rel)
    finally:
        source.close()
