"""How often does the lesion crop land off the lesion? ``largest`` against ``central``, per source.

    python -m experiments.crop_check --data ../shared/data --out docs/crop_check_cpu.json

For a random sample of each training source's photos, both ``crop_method`` settings of
``melanoma.classifier.preprocessing.lesion_box``: how many crops are centred far from the photo's
centre (dermoscopy photos are taken with the lesion in the middle, so such a crop has usually
framed a marker-ink mark, a ruler or a sticker instead), and how many boxes the two methods
place differently. ``--grid`` writes a picture of the photos where they differ (red: largest,
green: central) for a person to judge; keep it out of the repository (it shows the datasets' photos).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from melanoma.classifier.preprocessing import CROP_METHODS, lesion_box

SOURCES = {"melanoma10k": "melanoma10k/train/*/*.jpg", "ham10000": "ham10000/images/*.jpg",
           "isic2017": "isic2017/*/*/*.jpg", "isic2020": "isic2020/images/*.jpg"}
OFF_CENTRE = 0.2  # a crop whose centre is further than this (a fraction of the side) from the photo's


def off_centre(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    x, y, w, h = box
    return max(abs((x + w / 2) / width - 0.5), abs((y + h / 2) / height - 0.5)) > OFF_CENTRE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder holding the shared datasets")
    parser.add_argument("--per-source", type=int, default=400)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results, tiles = {}, []
    for name, pattern in SOURCES.items():
        paths = sorted(args.data.glob(pattern))
        paths = [paths[i] for i in rng.choice(len(paths), min(args.per_source, len(paths)), replace=False)]
        counts = {f"off_centre_{m}": 0 for m in CROP_METHODS} | {"moved": 0, "photos": len(paths)}
        for path in tqdm(paths, desc=name, unit="img"):
            image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_2), cv2.COLOR_BGR2RGB)
            h, w = image.shape[:2]
            boxes = {m: lesion_box(image, method=m) for m in CROP_METHODS}
            for method, box in boxes.items():
                counts[f"off_centre_{method}"] += off_centre(box, w, h)
            a, b = boxes["largest"], boxes["central"]
            if abs(a[0] - b[0]) > 0.1 * w or abs(a[1] - b[1]) > 0.1 * h or abs(a[2] - b[2]) > 0.1 * w:
                counts["moved"] += 1
                if args.grid is not None and len(tiles) < 36:
                    for (x, y, bw, bh), colour in ((a, (255, 0, 0)), (b, (0, 255, 0))):
                        cv2.rectangle(image, (x, y), (x + bw, y + bh), colour, max(2, w // 100))
                    tiles.append(cv2.resize(image, (200, 150)))
        results[name] = counts
        print(name, counts)
    args.out.write_text(json.dumps({"off_centre_threshold": OFF_CENTRE, "sources": results}, indent=1))
    if args.grid is not None and tiles:
        tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 6)
        grid = np.vstack([np.hstack(tiles[i:i + 6]) for i in range(0, len(tiles), 6)])
        cv2.imwrite(str(args.grid), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
