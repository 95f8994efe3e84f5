"""Screen a full-frame in-scope check: does the whole photo tell dermoscopy from other pictures?

    python -m experiments.full_frame_scope --data ../shared/data --out docs/full_frame_scope_cpu.json

The check the model carries (``melanoma.classifier.scope``) sees the lesion crop, which removes
what sets a dermoscopy photo apart from a clinical one (the dermoscope's field of view and light).
Here a Mahalanobis distance (Ledoit-Wolf covariance) on a thumbnail of the *whole* photo, in Lab,
is fitted on three training sources and thresholded so that 99 % of their held-back photos are in
scope; then judged on the fourth source (a new clinic's dermoscopy: should stay in scope), the
non-dermoscopic skin photos of ``out_of_scope_dev``, everyday photos (scikit-image's samples) and
generated pictures. Each source plays the new clinic in turn.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np
from sklearn.covariance import LedoitWolf
from tqdm import tqdm

from experiments.scope_check import everyday_photos
from melanoma.classifier.scope import IN_SCOPE_SHARE, threshold_for_share
from melanoma.data.out_of_scope import generated_pictures

log = logging.getLogger(__name__)
SOURCES = {"melanoma10k": "melanoma10k/train/*/*.jpg", "ham10000": "ham10000/images/*.jpg",
           "isic2017": "isic2017/*/*/*.jpg", "isic2020": "isic2020/images/*.jpg"}


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB photo -> its ``size`` x ``size`` Lab thumbnail, flattened (the whole frame, squashed)."""
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32).ravel()


def read(path: Path) -> np.ndarray | None:
    image = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_2)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def photos_of(paths: list[Path], desc: str) -> list[np.ndarray]:
    return [image for image in (read(p) for p in tqdm(paths, desc=desc, unit="img")) if image is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder holding the shared datasets")
    parser.add_argument("--per-source", type=int, default=1500)
    parser.add_argument("--sizes", default="8,16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rng = np.random.default_rng(0)
    sources = {}
    for name, pattern in SOURCES.items():
        paths = sorted(args.data.glob(pattern))
        chosen = [paths[i] for i in np.sort(rng.choice(len(paths), min(args.per_source, len(paths)), replace=False))]
        sources[name] = photos_of(chosen, name)
    folder = args.data / "out_of_scope_dev"
    with (folder / "images.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    out_of_scope = {f"skin photo, {kind}": photos_of([folder / r["file"] for r in rows if r["image_type"] == kind], kind)
                    for kind in sorted({r["image_type"] for r in rows})}
    out_of_scope["everyday photo"] = everyday_photos()
    crops_from = sources["ham10000"][:16]
    out_of_scope |= {f"generated, {kind}": pictures
                     for kind, pictures in generated_pictures(np.random.default_rng(0), crops_from, per_kind=16).items()}

    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        features = {name: np.stack([thumbnail(p, size) for p in photos]) for name, photos in
                    {**sources, **out_of_scope}.items()}
        for held in SOURCES:
            fit, check = [], []
            for name in SOURCES:
                if name != held:
                    order = rng.permutation(len(features[name]))
                    cut = int(0.8 * len(order))
                    fit.append(features[name][order[:cut]])
                    check.append(features[name][order[cut:]])
            model = LedoitWolf().fit(np.concatenate(fit))
            threshold = threshold_for_share(model.mahalanobis(np.concatenate(check)), IN_SCOPE_SHARE)
            row = {"thumbnail": size, "held_out_source": held, "fitted_on": int(sum(map(len, fit)))}
            for name, values in features.items():
                if name in SOURCES and name != held:
                    continue
                label = f"held-out source ({name})" if name == held else name
                row[label] = {"photos": int(len(values)),
                              "in_scope": float(np.mean(model.mahalanobis(values) <= threshold))}
            results.append(row)
            log.info("%s", json.dumps(row))
            args.out.write_text(json.dumps({"in_scope_share": IN_SCOPE_SHARE, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
