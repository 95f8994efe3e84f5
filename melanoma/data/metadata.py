"""The metadata layout: a folder of images plus a CSV with one row per image, as HAM10000 and
ISIC archive exports ship (``image_id``, ``lesion_id`` or ``patient_id``, ``dx``, optionally a
source or site column).

Diagnoses become classes through a label map, ``"mel:malignant,nv:benign"`` by default; rows
with other diagnoses are left out and counted, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from pathlib import PurePosixPath

from melanoma.classifier.errors import SettingsError
from melanoma.data.records import CLASSES, DataError, ImageRecord, Source

log = logging.getLogger(__name__)

DEFAULT_LABEL_MAP = "mel:malignant,nv:benign"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
GROUP_COLUMNS = ("patient_id", "lesion_id")  # the patient first: a patient's lesions stay together too
SOURCE_COLUMNS = ("source", "dataset", "site", "attribution")
REQUIRED = ("image_id", "dx")


def parse_label_map(text: str) -> dict[str, int]:
    """``"mel:malignant,bcc:malignant,nv:benign"`` -> {diagnosis: label}."""
    mapping = {}
    for pair in (text or DEFAULT_LABEL_MAP).split(","):
        dx, sep, name = (part.strip().lower() for part in pair.partition(":"))
        if not sep or not dx or name not in CLASSES:
            raise SettingsError(f"bad label map entry {pair.strip()!r}: expected diagnosis:benign or diagnosis:malignant")
        mapping[dx] = CLASSES.index(name)
    return mapping


def _read_header(source: Source, rel: str) -> list[str]:
    first = source.read(rel).decode("utf-8-sig", errors="replace").splitlines()[:1]
    return [c.strip().lower() for c in next(csv.reader(first), [])]


def find_metadata_csv(source: Source, files: list[str]) -> str | None:
    """The shallowest CSV whose header has ``image_id`` and ``dx``, if any (None: not this layout)."""
    candidates = sorted((f for f in files if f.lower().endswith(".csv")), key=lambda f: (f.count("/"), f))
    for rel in candidates:
        if set(REQUIRED) <= set(_read_header(source, rel)):
            return rel
    for rel in candidates[:1]:
        if {"image_id", "image", "isic_id"} & set(_read_header(source, rel)):
            raise DataError(f"metadata file {source.location / rel} needs the columns {', '.join(REQUIRED)} "
                            f"(it has {', '.join(_read_header(source, rel))})")
    return None


def discover_metadata(source: Source, files: list[str], csv_rel: str, label_map: str,
                      split: str = "train") -> list[ImageRecord]:
    """The labelled images the CSV names, each with its patient (or lesion) group and source."""
    mapping = parse_label_map(label_map)
    text = source.read(csv_rel).decode("utf-8-sig", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in rows]
    images = {PurePosixPath(f).stem: f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)}
    columns = set(rows[0]) if rows else set()
    group_column = next((c for c in GROUP_COLUMNS if c in columns), None)
    source_column = next((c for c in SOURCE_COLUMNS if c in columns), None)
    default_source = source.location.stem

    records, left_out, missing = [], Counter(), []
    for row in rows:
        dx = row["dx"].lower()
        if dx not in mapping:
            left_out[dx or "(empty)"] += 1
            continue
        path = images.get(row["image_id"])
        if path is None:
            missing.append(row["image_id"])
            continue
        group = row.get(group_column, "") if group_column else ""
        records.append(ImageRecord(path, mapping[dx], split, group=group or row["image_id"],
                                   source=(row.get(source_column) if source_column else "") or default_source))
    named = {row["image_id"] for row in rows}
    image_dirs = {PurePosixPath(images[i]).parent for i in named if i in images}
    unlisted = [f for stem, f in images.items() if stem not in named and PurePosixPath(f).parent in image_dirs]
    where = source.location / csv_rel
    if left_out:
        log.warning("%s: left out %d rows whose diagnosis the label map does not name: %s", where,
                    sum(left_out.values()), dict(left_out))
    if missing:
        log.warning("%s: %d rows name an image that is not in %s (e.g. %s)", where, len(missing), source.location,
                    ", ".join(missing[:3]))
    if unlisted:
        log.warning("%s: %d image files have no row in the metadata and are not used (e.g. %s)", where,
                    len(unlisted), ", ".join(unlisted[:3]))
    if not records and left_out and not missing:
        raise DataError(f"{source.location.stem}: the label map {label_map or DEFAULT_LABEL_MAP!r} maps none of its "
                        f"diagnoses ({dict(left_out)} in {where}); name them as diagnosis:benign or "
                        "diagnosis:malignant")
    if not records:
        raise DataError(f"{where}: no labelled images ({len(rows)} rows, {len(missing)} without an image file, "
                        f"left out: {dict(left_out)})")
    return records
