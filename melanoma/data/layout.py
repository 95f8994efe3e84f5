"""Finding the images: a folder or a zip in the Kaggle layout, a folder of images with a metadata
CSV (HAM10000, ISIC archive exports), or a plain class folder."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CLASSES = ("benign", "malignant")  # label = index: malignant (1) is the positive class
SPLITS = ("train", "test")

EXPECTED_LAYOUT = (
    "Expected the Kaggle layout <root>/train/benign/*.jpg and <root>/train/malignant/*.jpg "
    "(optionally <root>/test/{benign,malignant}/), or the dataset's .zip file"
)
EVAL_LAYOUT = (
    "Expected <root>/benign/ and/or <root>/malignant/ image folders, the Kaggle layout, "
    "or a single folder named benign or malignant"
)


class DataError(ValueError):
    """The dataset is missing or not in a layout we understand."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # posix path relative to the source (a folder or a zip)
    label: int
    split: str  # "train", "test" or "eval"
    group: str = ""  # photos of one lesion (or patient) share it; "" = the photo alone
    source: str = ""  # the collection or site the photo comes from; "" = the dataset's name


class Source:
    """A folder or a zip file holding images, read by relative posix path."""

    def __init__(self, location: str | Path):
        self.location = Path(location).expanduser().resolve()
        if not self.location.exists():
            raise DataError(f"data path {self.location} does not exist. {EXPECTED_LAYOUT}.")
        self.is_zip = self.location.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.location):
            raise DataError(f"{self.location} is a file but not a zip archive. {EXPECTED_LAYOUT}.")
        self._zip: zipfile.ZipFile | None = None

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """(relative posix path, stat) of every file under the folder, in one pass."""
        stack = [""]
        while stack:
            prefix = stack.pop()
            with os.scandir(self.location / prefix) as entries:
                for entry in entries:
                    rel = f"{prefix}{entry.name}"
                    if entry.is_dir():
                        stack.append(rel + "/")
                    elif entry.is_file():
                        yield rel, entry.stat()

    def files(self) -> list[str]:
        """Every file, as sorted relative posix paths."""
        if self.is_zip:
            with zipfile.ZipFile(self.location) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        else:
            names = [rel for rel, _ in self._walk()]
        return sorted(n for n in names if "__MACOSX" not in n)

    def fingerprint(self) -> list:
        """Cheap identity of the contents (names, sizes, modification times) for cache keys."""
        if self.is_zip:
            stat = self.location.stat()
            return [str(self.location), stat.st_size, stat.st_mtime_ns]
        return sorted([rel, st.st_size, st.st_mtime_ns] for rel, st in self._walk())

    def read(self, rel: str) -> bytes:
        if self.is_zip:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.location)
            return self._zip.read(rel)
        return (self.location / rel).read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


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
    from melanoma.data.metadata import discover_metadata, find_metadata_csv

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
