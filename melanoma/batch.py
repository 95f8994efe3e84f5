"""``melanoma predict``: score files, folders or CSVs of paths through a logged model.

Streams: images are read and scored a chunk at a time and each chunk's rows are appended to
the output CSV, so memory stays flat for any number of images and a killed job loses at most
one chunk. Rerunning with the same output skips every path already in it. A file that cannot
be read or scored gets a row with its error instead of stopping the job.
"""

from __future__ import annotations

import base64
import csv
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from melanoma.classifier.pyfunc import file_problem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
COLUMNS = ["path", "malignant_probability", "benign_probability", "label", "in_scope", "scope_score", "scope_check",
           "error"]


def image_paths(inputs: Iterable[Path]) -> Iterator[Path]:
    """Every image named by ``inputs``: a file as it is, a folder's images (recursively, in
    sorted order), a ``.csv``'s paths (column ``path``, else the first; relative to the CSV)."""
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv" and item.is_file():
            with item.open(newline="") as handle:
                rows = csv.reader(handle)
                header = next(rows, [])
                column = header.index("path") if "path" in header else 0
                if "path" not in header and header:
                    yield item.parent / header[0]
                yield from (item.parent / row[column] for row in rows if row)
        elif item.is_dir():
            for folder, subfolders, files in os.walk(item):
                subfolders.sort()
                yield from (Path(folder) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            yield item
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")


def done_paths(out: Path) -> set[str]:
    """Paths already in an output CSV (empty when it does not exist yet)."""
    if not out.exists():
        return set()
    with out.open(newline="") as handle:
        return {row["path"] for row in csv.DictReader(handle)}


def explained_name(path: Path) -> str:
    """A file name for ``path``'s explanation, unique per path."""
    return str(path).strip("/").replace("/", "__").replace("\\", "__") + ".explained.png"


def score_chunk(model, paths: list[Path], explain: bool) -> tuple[list[dict], dict[Path, bytes]]:
    """One row per path (unreadable or refused files get their error, the rest their scores),
    and the bytes of the files that could be read."""
    rows, files = {}, {}
    for path in paths:
        try:
            files[path] = path.read_bytes()
        except OSError as exc:
            rows[path] = {"path": str(path), "error": f"cannot read: {exc.strerror or exc}"}
    if files:
        for path, answer in zip(files, predict_rows(model, list(files.values()), explain)):
            rows[path] = {"path": str(path), **answer}
    return [rows[p] for p in paths], files


def predict_rows(model, files: list[bytes], explain: bool) -> list[dict]:
    """The model's answer per file; when it refuses a chunk, each file alone, so one bad file
    costs only its own row."""
    frame = pd.DataFrame({"image": [base64.b64encode(f).decode("ascii") for f in files]})
    try:
        return model.predict(frame, params={"explain": explain}).to_dict("records")
    except MlflowException as exc:
        if len(files) == 1:
            return [{"error": file_problem(exc)}]
        return [row for f in files for row in predict_rows(model, [f], explain)]


def write_explanation(folder: Path, path: Path, data: bytes, overlay_png: str) -> None:
    """``original | overlay`` side by side, as PNG."""
    from melanoma.classifier.gradcam import side_by_side

    explained = cv2.imdecode(np.frombuffer(base64.b64decode(overlay_png), np.uint8), cv2.IMREAD_COLOR)
    photo = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    cv2.imwrite(str(folder / explained_name(path)), side_by_side(photo, explained))


def predict_files(model_uri: str, inputs: list[Path], out: Path, explain_dir: Path | None = None,
                  chunk_size: int = 32) -> dict[str, int]:
    """Score every image of ``inputs`` into the CSV ``out``; returns counts of what was done."""
    import mlflow

    skip = done_paths(out)
    total = sum(1 for p in image_paths(inputs) if str(p) not in skip)
    counts = {"scored": 0, "errors": 0, "skipped_already_done": len(skip)}
    if total == 0:
        return counts
    model = mlflow.pyfunc.load_model(model_uri)
    logged = model.unwrap_python_model().model
    counts |= {"threshold": logged.threshold, "threshold_rule": f"the threshold {logged.rule.in_words()}"}
    if explain_dir is not None:
        explain_dir.mkdir(parents=True, exist_ok=True)
    todo = (p for p in image_paths(inputs) if str(p) not in skip)
    new_file = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", newline="") as handle, tqdm(total=total, desc="scoring", unit="img") as bar:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        while chunk := list(islice(todo, chunk_size)):
            rows, files = score_chunk(model, chunk, explain_dir is not None)
            for path, row in zip(chunk, rows):
                if explain_dir is not None and row.get("gradcam_png"):
                    write_explanation(explain_dir, path, files[path], row["gradcam_png"])
                counts["errors" if row.get("error") else "scored"] += 1
            writer.writerows(rows)
            handle.flush()
            bar.update(len(chunk))
    return counts
