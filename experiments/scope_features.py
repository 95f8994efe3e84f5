"""Can any features tell a skin photo taken without a dermoscope from dermoscopy, unshown?

    python -m experiments.scope_features --runs CROSSVAL_ID --out-of-scope ../shared/data/out_of_scope_dev \
        --out docs/scope_features_cpu.json

The check catches 1-6 % of the non-dermoscopic skin photos (docs/results.md). Is that the
check's features or the task? For each child of a finished cross-source validation, photos of
its training sources (fit and validation, an equal number from each) and of the source it never
saw, and several feature families: the check's own (the child's stage statistics of the lesion
crop), the same statistics of the whole frame (at the model's size and at 224 px), an ImageNet
EfficientNet-Lite0's stage statistics of the whole frame (96 and 224 px), and statistics made by
hand at full resolution (surface glare, sharpness at three scales, colour, vignette). Each is
judged twice, thresholded so that 99 % of every training source's validation photos are in scope:

- ``one class``: the check's distance (``fit_scope``) fitted on dermoscopy alone, as shipped;
- ``boundary, leave one clinic out``: a logistic regression (``learn_boundary``'s settings),
  dermoscopy against the non-dermoscopic photos of every clinic but one, judged on that clinic
  (what a user supplying ``scope_negatives`` could get).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import nn

from experiments.scope_check import children_to_measure, scope_arguments
from melanoma.classifier.inference import scope_features, select_device
from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec, Region, decode_image, preprocess
from melanoma.classifier.scope import BOUNDARY_C, fit_scope, threshold_for_sources
from melanoma.data.layout import read_file

log = logging.getLogger(__name__)
FIT_PER_SOURCE, VAL_PER_SOURCE, HELD_PHOTOS = 300, 150, 400
WHOLE_FRAME = Region(0.0, 0.0, 1.0, 1.0)
MIN_CLINIC = 5  # clinics with fewer photos are never left out alone


def by_hand(image: np.ndarray) -> np.ndarray:
    """Statistics of the whole photo at 512 px: the share of glare (bright, colourless pixels),
    the sharpness (mean absolute Laplacian) at three scales, the Lab means and spreads, and how
    much darker the corners are than the centre (a dermoscope's vignette)."""
    h, w = image.shape[:2]
    scale = 512 / max(h, w)
    image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32) / 255
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    glare = np.mean((hsv[..., 2] > 0.92) & (hsv[..., 1] < 0.2))
    sharpness = [np.abs(cv2.Laplacian(cv2.resize(grey, None, fx=f, fy=f, interpolation=cv2.INTER_AREA),
                                      cv2.CV_32F)).mean() for f in (1, 0.5, 0.25)]
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32).reshape(-1, 3)
    gh, gw = grey.shape[0] // 8, grey.shape[1] // 8
    corners = np.mean([grey[:gh, :gw].mean(), grey[:gh, -gw:].mean(), grey[-gh:, :gw].mean(), grey[-gh:, -gw:].mean()])
    centre = grey[grey.shape[0] // 4:-grey.shape[0] // 4, grey.shape[1] // 4:-grey.shape[1] // 4].mean()
    return np.r_[glare, np.log(np.array(sharpness) + 1e-4), lab.mean(0), lab.std(0), corners, centre - corners]


def families(network: nn.Module, spec: PreprocessSpec, imagenet: nn.Module,
             device: torch.device) -> dict[str, Callable[[list[np.ndarray]], np.ndarray]]:
    """Feature family name -> features (N, D) of RGB photos."""
    imagenet_spec = PreprocessSpec(img_size=96, crop_lesion=False, rgb_mean=(0.5,) * 3, rgb_std=(0.5,) * 3)

    def statistics(net: nn.Module, view: PreprocessSpec, region: Region | None) -> Callable:
        return lambda photos: scope_features(net, np.stack([preprocess(p, view, region) for p in photos]), view, device)

    return {"the check's: the model's stage statistics of the lesion crop": statistics(network, spec, None),
            "the model's stage statistics of the whole frame": statistics(network, spec, WHOLE_FRAME),
            "the model's stage statistics of the whole frame at 224 px":
                statistics(network, dataclasses.replace(spec, img_size=224), WHOLE_FRAME),
            "ImageNet Lite0 stage statistics of the whole frame, 96 px":
                statistics(imagenet, imagenet_spec, WHOLE_FRAME),
            "ImageNet Lite0 stage statistics of the whole frame, 224 px":
                statistics(imagenet, dataclasses.replace(imagenet_spec, img_size=224), WHOLE_FRAME),
            "by hand, whole frame at full resolution": lambda photos: np.stack([by_hand(p) for p in photos])}


def judge(x: np.ndarray, fit: np.ndarray, val: np.ndarray, val_sources: np.ndarray, held: np.ndarray,
          skin: np.ndarray, clinics: np.ndarray) -> dict[str, float]:
    """Shares of the held-out source in scope and of skin photos caught, one class and learned."""
    from sklearn.linear_model import LogisticRegression

    x = x.astype(np.float64)
    distance = fit_scope(x[fit], components=min(64, x.shape[1] - 1)).distance
    d = distance(torch.as_tensor(x, dtype=torch.float32)).numpy()
    limit = threshold_for_sources(d[val], val_sources)
    result = {"one class: held-out source in scope": float(np.mean(d[held] <= limit)),
              "one class: skin photos caught": float(np.mean(d[skin] > limit))}
    mean, scale = x[fit].mean(0), x[fit].std(0) + 0.01 * x[fit].std(0).mean() + 1e-12
    caught, shown, kept = 0, 0, []
    for clinic in np.unique(clinics):
        out = clinics == clinic
        if out.sum() < MIN_CLINIC:
            continue
        negatives = skin[~out]
        fitted = LogisticRegression(C=BOUNDARY_C, class_weight="balanced", max_iter=3000).fit(
            (np.r_[x[fit], x[negatives]] - mean) / scale, np.r_[np.zeros(len(fit)), np.ones(len(negatives))])
        odds = fitted.decision_function((x - mean) / scale)
        limit = threshold_for_sources(odds[val], val_sources)
        caught, shown = caught + int(np.sum(odds[skin[out]] > limit)), shown + int(out.sum())
        kept.append(float(np.mean(odds[held] <= limit)))
    result.update({"boundary, leave one clinic out: skin photos caught": caught / shown,
                   "boundary, leave one clinic out: held-out source in scope, worst": min(kept),
                   "boundary, leave one clinic out: held-out source in scope, mean": float(np.mean(kept))})
    return result


def main() -> None:
    args, rows = scope_arguments(__doc__.splitlines()[0])
    device = select_device()
    imagenet = build_model("efficientnet_lite0", 3, "true").to(device).eval()
    with (args.out_of_scope / "images.csv").open(newline="") as handle:
        listed = list(csv.DictReader(handle))
    skin_photos = [decode_image((args.out_of_scope / row["file"]).read_bytes()) for row in listed]
    clinics = np.array([row["attribution"] for row in listed])
    for source, child, network, spec, cfg, data in children_to_measure(args, rows, device):
        d, rng = data.data, np.random.default_rng(cfg.seed)
        sources = np.asarray(d.sources)
        fit, val = [], []
        for name in np.unique(sources[data.fit_idx]):
            fit.append(rng.permutation(data.fit_idx[sources[data.fit_idx] == name])[:FIT_PER_SOURCE])
            val.append(rng.permutation(data.val_idx[sources[data.val_idx] == name])[:VAL_PER_SOURCE])
        held = rng.permutation(data.holdout_idx)[:HELD_PHOTOS]
        chosen = np.concatenate([*fit, *val, held])
        photos = [decode_image(read_file(d.locations[i], d.paths[i])) for i in chosen] + skin_photos
        n_fit, n_val = sum(map(len, fit)), sum(map(len, val))
        at = np.cumsum([0, n_fit, n_val, len(held), len(skin_photos)])
        parts = [np.arange(at[k], at[k + 1]) for k in range(4)]
        row = {"source": source, "child_run": child, "photos": {"fit": n_fit, "validation": n_val,
               "held-out source": len(held), "skin photos": len(skin_photos)}, "families": {}}
        for name, features in families(network, spec, imagenet, device).items():
            row["families"][name] = judge(features(photos), parts[0], parts[1], sources[chosen[n_fit:n_fit + n_val]],
                                          parts[2], parts[3], clinics)
            log.info("%s %s: %s", source, name, row["families"][name])
        rows.append(row)
        args.out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
