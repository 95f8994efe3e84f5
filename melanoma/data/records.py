"""What every part of the data code shares: the classes, a labelled file's record, the data
error, and a dataset's files read from a folder or a zip."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melanoma.classifier.decision import CLASSES

EXPECTED_LAYOUT = (
    "Expected the Kaggle layout <root>/train/benign/*.jpg and <root>/train/malignant/*.jpg "
    "(optionally <root>/test/{benign,malignant}/), or the dataset's .zip file"
)


class DataError(ValueError):
    """The dataset is missing or not in a layout we understand."""


def missing_classes(labels: np.ndarray) -> list[str]:
    """The names of the classes that have no image among ``labels``."""
    return [name for label, name in enumerate(CLASSES) if not np.any(np.asarray(labels) == label)]


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
