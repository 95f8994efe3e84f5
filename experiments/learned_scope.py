"""Can the in-scope check learn from pictures a user says are out of scope, and does it travel?

    python -m experiments.learned_scope --runs CROSSVAL_ID --out-of-scope ../shared/data/out_of_scope_dev \
        --out docs/learned_scope_cpu.json

For each child of a finished cross-source validation (a model trained without one source), the
check before the colour limit (the distance of the stage statistics to the training photos'),
the default check (with the colour limit, ``ScopeModel.with_colour_limit``) and the check that
also learns a boundary (``learn_boundary``: a logistic regression on the same
statistics, training photos against out-of-scope pictures). Two sets of such pictures: generated
ones alone (what every training run can make), and generated ones plus the non-dermoscopic skin
photos of every clinic but one (what a user could supply with ``scope_negatives``), judged on the
clinic left out. Every check is thresholded at 99 % of the validation photos in scope, as
training does, and judged on the source the child never saw (which must stay in scope), everyday
photos and generated pictures it did not learn from (another seed).
"""

from __future__ import annotations

import csv
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch

from experiments.scope_check import children_to_measure, everyday_photos, scope_arguments
from melanoma.classifier.inference import scope_features, select_device
from melanoma.classifier.preprocessing import InvalidImageError, decode_for_model, preprocess
from melanoma.classifier.scope import (
    IN_SCOPE_SHARE,
    ScopeModel,
    colourfulness,
    fit_scope,
    learn_boundary,
    threshold_for_share,
)
from melanoma.data.out_of_scope import generated_pictures

log = logging.getLogger(__name__)
FIT_PHOTOS = 2000
HELD_PHOTOS = 800


def clinic_photos(folder: Path, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The folder's photos as model inputs, with each one's clinic and kind (images.csv)."""
    images, clinics, kinds = [], [], []
    with (folder / "images.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                images.append(preprocess(decode_for_model((folder / row["file"]).read_bytes(), spec), spec))
            except InvalidImageError:
                continue
            clinics.append(row["attribution"])
            kinds.append(row["image_type"])
    return np.stack(images), np.array(clinics), np.array(kinds)


def generated(spec, photos: list[np.ndarray], seed: int) -> np.ndarray:
    pictures = generated_pictures(np.random.default_rng(seed), photos, per_kind=16)
    return np.stack([preprocess(p, spec) for kind in pictures.values() for p in kind])


Inputs = tuple[np.ndarray, np.ndarray]  # the pictures' stage statistics and colourfulness


def fit_and_held(data, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training photos the check is fitted on and the held-out source's photos it is judged
    on, drawn as every scope experiment draws them."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(data.fit_idx)[:FIT_PHOTOS]), np.sort(rng.permutation(data.holdout_idx)[:HELD_PHOTOS])


def check_inputs(network: torch.nn.Module, spec, device: torch.device, images: np.ndarray) -> Inputs:
    """What the check reads of model inputs: their stage statistics and colourfulness."""
    images = np.asarray(images)
    return scope_features(network, images, spec, device), colourfulness(torch.from_numpy(images)).numpy()


def judge(scope: ScopeModel, val: Inputs, sets: dict[str, Inputs]) -> dict[str, float]:
    """The share of each set flagged, at the threshold that keeps 99 % of validation in scope."""
    def score(inputs: Inputs) -> np.ndarray:
        return scope(*(torch.from_numpy(a) for a in inputs)).numpy()

    threshold = threshold_for_share(score(val), IN_SCOPE_SHARE)
    return {name: float(np.mean(score(f) > threshold)) for name, f in {"validation": val, **sets}.items()}


def main() -> None:
    args, rows = scope_arguments(__doc__.splitlines()[0])
    device = select_device()
    for source, child, network, spec, cfg, data in children_to_measure(args, rows, device):
        d = data.data
        fit, held = fit_and_held(data, cfg.seed)
        inputs = partial(check_inputs, network, spec, device)

        fit_x, val_x, held_x = inputs(d.images[fit]), inputs(d.images[data.val_idx]), inputs(d.images[held])
        photos = [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in np.asarray(d.images[data.val_idx[:16]])]
        generated_x, generated_new_x = inputs(generated(spec, photos, 0)), inputs(generated(spec, photos, 1))
        everyday_x = inputs(np.stack([preprocess(p, spec) for p in everyday_photos()]))
        skin, clinics, kinds = clinic_photos(args.out_of_scope, spec)
        skin_x = inputs(skin)
        distance = fit_scope(fit_x[0])

        def coloured(scope: ScopeModel, val_colour=val_x[1]) -> ScopeModel:
            return scope.with_colour_limit(val_colour)

        common = {f"held-out source ({source})": held_x, "everyday photo": everyday_x,
                  "generated, another seed": generated_new_x}
        row = {"source": source, "child_run": child, "fitted_on": len(fit), "checks": {}}
        skin_all = {**common, "skin photos, all clinics": skin_x}
        row["checks"]["distance alone"] = judge(distance, val_x, skin_all)
        row["checks"]["distance + colour limit"] = judge(coloured(distance), val_x, skin_all)
        row["checks"]["+ boundary learned on generated"] = judge(
            coloured(learn_boundary(distance, fit_x[0], generated_x[0], val_x[0])), val_x, skin_all)
        for clinic in sorted(set(clinics)):
            out = clinics == clinic
            if out.sum() < 5:
                continue
            learned = learn_boundary(distance, fit_x[0], np.concatenate([generated_x[0], skin_x[0][~out]]),
                                     val_x[0])
            left_out = f"skin photos of {clinic} ({out.sum()}, {', '.join(sorted(set(kinds[out])))})"
            row["checks"][f"+ boundary learned on generated + skin photos but {clinic}"] = judge(
                coloured(learned), val_x, {**common, left_out: (skin_x[0][out], skin_x[1][out])})
        rows.append(row)
        log.info("%s", json.dumps(row)[:3000])
        args.out.write_text(json.dumps({"in_scope_share": IN_SCOPE_SHARE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
