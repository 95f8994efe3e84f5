"""Does a new clinic's dermoscopy stay in scope when the check is fitted and thresholded per source?

    python -m experiments.balanced_scope --runs CROSSVAL_ID --out-of-scope ../shared/data/out_of_scope_dev \
        --out docs/balanced_scope_cpu.json

The check was fitted on training photos drawn at random, so the largest source shaped it, and
thresholded at 99 % of the pooled validation photos, so a smaller source's photos could be the
ones left out. For each child of a finished cross-source validation (a model trained without one
source), four variants of the default check (distance + colour limit), each judged on the source
the child never saw (which must stay in scope), the non-dermoscopic skin photos, everyday photos,
generated pictures, and the issue's own two examples (the temple and the flower scikit-learn
ships, once called malignant at 0.47 and 0.78):

- ``pooled``: as training did before this experiment (random fit photos, 99 % of pooled validation);
- ``balanced fit``: the same number of fit photos, an equal share from each source;
- ``per-source threshold``: the threshold that keeps 99 % of every source's validation photos
  (what training does since);
- ``both``.
"""

from __future__ import annotations

import json
import logging
from functools import partial

import numpy as np
import torch
from sklearn.datasets import load_sample_images

from experiments.learned_scope import FIT_PHOTOS, Inputs, check_inputs, clinic_photos, generated
from experiments.scope_check import children_to_measure, everyday_photos, scope_arguments
from melanoma.classifier.inference import select_device
from melanoma.classifier.preprocessing import preprocess
from melanoma.classifier.scope import IN_SCOPE_SHARE, ScopeModel, fit_scope, threshold_for_share

log = logging.getLogger(__name__)
HELD_PHOTOS = 800


def balanced_sample(indices: np.ndarray, sources: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` of ``indices``, an equal share from each source (all of a smaller one)."""
    share = count // len(np.unique(sources[indices]))
    return np.sort(np.concatenate([rng.permutation(indices[sources[indices] == s])[:share]
                                   for s in np.unique(sources[indices])]))


def main() -> None:
    args, rows = scope_arguments(__doc__.splitlines()[0])
    device = select_device()
    for source, child, network, spec, cfg, data in children_to_measure(args, rows, device):
        d, rng = data.data, np.random.default_rng(cfg.seed)
        sources = np.asarray(d.sources)
        fits = {"random": np.sort(rng.permutation(data.fit_idx)[:FIT_PHOTOS]),
                "balanced": balanced_sample(np.asarray(data.fit_idx), sources, FIT_PHOTOS, rng)}
        held = np.sort(rng.permutation(data.holdout_idx)[:HELD_PHOTOS])
        inputs = partial(check_inputs, network, spec, device)

        val = np.asarray(data.val_idx)
        val_x = inputs(d.images[val])
        photos = [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in np.asarray(d.images[val[:16]])]
        skin, _, _ = clinic_photos(args.out_of_scope, spec)
        sets = {f"held-out source ({source})": inputs(d.images[held]),
                "everyday photo": inputs(np.stack([preprocess(p, spec) for p in everyday_photos()])),
                "generated": inputs(generated(spec, photos, 1)), "skin photos (all 130)": inputs(skin),
                **{f"the issue's {name} (scikit-learn's sample photo)": inputs(preprocess(photo, spec)[None])
                   for name, photo in zip(("temple", "flower"), load_sample_images().images)}}

        def score(scope: ScopeModel, x: Inputs) -> np.ndarray:
            return scope(*(torch.from_numpy(a) for a in x)).numpy()

        row = {"source": source, "child_run": child, "fitted_on": FIT_PHOTOS, "checks": {},
               "fit_photos_per_source": {k: {s: int((sources[v] == s).sum()) for s in np.unique(sources[v])}
                                         for k, v in fits.items()}}
        for fit_name, fit in fits.items():
            scope = fit_scope(inputs(d.images[fit])[0]).with_colour_limit(val_x[1])
            val_scores = score(scope, val_x)
            thresholds = {"pooled": threshold_for_share(val_scores, IN_SCOPE_SHARE),
                          "per source": max(threshold_for_share(val_scores[sources[val] == s], IN_SCOPE_SHARE)
                                            for s in np.unique(sources[val]))}
            for threshold_name, threshold in thresholds.items():
                result = {f"validation, {s}": float(np.mean(val_scores[sources[val] == s] <= threshold))
                          for s in np.unique(sources[val])}
                result["validation"] = float(np.mean(val_scores <= threshold))
                result.update({name: float(np.mean(score(scope, x) <= threshold)) for name, x in sets.items()})
                row["checks"][f"{fit_name} fit, {threshold_name} threshold"] = result  # shares in scope
        rows.append(row)
        log.info("%s", json.dumps(row)[:3000])
        args.out.write_text(json.dumps({"in_scope_share": IN_SCOPE_SHARE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
