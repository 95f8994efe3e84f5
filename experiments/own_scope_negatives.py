"""A clinic supplies some of its own non-dermoscopic photos: how many of its others are caught?

    python -m experiments.own_scope_negatives --runs CROSSVAL_ID --out-of-scope ../shared/data/out_of_scope_dev \
        --out docs/own_scope_negatives_cpu.json

A boundary learned from other clinics' non-dermoscopic photos catches 30-60 % of an unseen
clinic's (docs/results.md). A deployment can do better than other clinics' photos: supply its
own (``melanoma train --scope_negatives DIR``). For each child of a finished cross-source
validation and each clinic with at least ``MIN_PHOTOS`` photos in the folder, the clinic's photos
are split in two, seeded; the check learns its boundary (``learn_boundary``) from generated
pictures and one half, and is judged on the other half, both ways round. Thresholds as training
sets them: 99 % of every training source's validation photos in scope. Also judged: the source
the child never saw (must stay in scope), everyday photos and generated pictures of another seed.
"""

from __future__ import annotations

import json
import logging
from functools import partial

import numpy as np
import torch

from experiments.learned_scope import Inputs, check_inputs, clinic_photos, fit_and_held, generated
from experiments.scope_check import children_to_measure, everyday_photos, scope_arguments
from melanoma.classifier.inference import select_device
from melanoma.classifier.preprocessing import preprocess
from melanoma.classifier.scope import IN_SCOPE_SHARE, ScopeModel, fit_scope, learn_boundary, threshold_for_sources

log = logging.getLogger(__name__)
MIN_PHOTOS = 10


def main() -> None:
    args, rows = scope_arguments(__doc__.splitlines()[0])
    device = select_device()
    for source, child, network, spec, cfg, data in children_to_measure(args, rows, device):
        d = data.data
        fit, held = fit_and_held(data, cfg.seed)
        val_sources = np.asarray(d.sources)[data.val_idx]
        inputs = partial(check_inputs, network, spec, device)

        fit_x, val_x = inputs(d.images[fit]), inputs(d.images[data.val_idx])
        photos = [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in np.asarray(d.images[data.val_idx[:16]])]
        generated_x = inputs(generated(spec, photos, 0))
        sets = {f"held-out source ({source})": inputs(d.images[held]),
                "everyday photo": inputs(np.stack([preprocess(p, spec) for p in everyday_photos()])),
                "generated, another seed": inputs(generated(spec, photos, 1))}
        skin, clinics, kinds = clinic_photos(args.out_of_scope, spec)
        skin_x = inputs(skin)
        distance = fit_scope(fit_x[0])

        def shares_in_scope(scope: ScopeModel, judged: dict[str, Inputs]) -> dict[str, float]:
            def score(x: Inputs) -> np.ndarray:
                return scope(*(torch.from_numpy(a) for a in x)).numpy()

            threshold = threshold_for_sources(score(val_x), val_sources, IN_SCOPE_SHARE)
            return {name: float(np.mean(score(x) <= threshold)) for name, x in {"validation": val_x, **judged}.items()}

        row = {"source": source, "child_run": child, "fitted_on": len(fit), "clinics": {}}
        row["default check"] = shares_in_scope(distance.with_colour_limit(val_x[1]),
                                               {**sets, "skin photos, all": skin_x})
        for clinic in sorted(set(clinics)):
            own = np.flatnonzero(clinics == clinic)
            if len(own) < MIN_PHOTOS:
                continue
            halves = np.array_split(np.random.default_rng(cfg.seed).permutation(own), 2)
            folds = []
            for supplied, judged in (halves, halves[::-1]):
                learned = learn_boundary(distance, fit_x[0], np.concatenate([generated_x[0], skin_x[0][supplied]]),
                                         val_x[0]).with_colour_limit(val_x[1])
                folds.append(shares_in_scope(learned, {**sets, "the clinic's other photos":
                                                       (skin_x[0][judged], skin_x[1][judged])}))
            row["clinics"][clinic] = {"photos": len(own), "kinds": sorted(set(kinds[own])),
                                      "supplied per fold": [len(h) for h in halves],
                                      "folds": folds}
        rows.append(row)
        log.info("%s", json.dumps(row)[:3000])
        args.out.write_text(json.dumps({"in_scope_share": IN_SCOPE_SHARE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
