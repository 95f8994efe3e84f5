"""Site fine-tuning judged on the rest of the site: does ``melanoma adapt --finetune`` help a clinic's
next patients, and does its cross-fitted estimate say so honestly?

    python -m experiments.site_finetune --runs CROSSVAL_ID --sizes 100,200,400 --draws 2 \
        --out docs/site_finetune_cpu.json

Each held-out source of a finished cross-source validation plays the clinic for the child model
trained without it. N of its photos are drawn at random (whole patients or lesions), and the
adaptation runs on them as ``melanoma adapt --finetune`` does (``finetune_for_site``: recipes
cross-fitted, the best chosen out of fold, the guard, calibration and threshold from the
out-of-fold scores). The rest of the source, patients the adaptation never saw, is the truth:
AUC before and after, the cross-fitted gain beside the gain measured there, sensitivity and
specificity at the served threshold, and the AUC on the child's own validation photos
(forgetting), for both site models (``SITE_MODELS``: the fold models averaged, one model
fine-tuned on all photos) in every draw, and for what adapt serves (``--site_model``). With
``--replay`` every draw of the largest N also runs with that share of training photos replayed
in each batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from experiments.heldout import child_inputs, children
from melanoma.classifier.calibration import fit_calibration
from melanoma.classifier.inference import Scorer, predict_logits, select_device
from melanoma.data.records import DataError
from melanoma.data.training_data import load_data
from melanoma.evaluate import Predictions, classification_metrics
from melanoma.finetune import SITE_MODELS, finetune, finetune_for_site, fold_models, parse_recipes
from melanoma.workflows.adapt import site_operating_point

log = logging.getLogger(__name__)


def draw_site(groups: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(site, rest) indices: whole groups drawn at random until ``size`` photos."""
    order = rng.permutation(np.unique(groups))
    counts = {g: c for g, c in zip(*np.unique(groups, return_counts=True))}
    chosen, total = [], 0
    for g in order:
        if total >= size:
            break
        chosen.append(g)
        total += counts[g]
    site = np.isin(groups, chosen)
    return np.flatnonzero(site), np.flatnonzero(~site)


def probabilities(network: torch.nn.Module, spec, images: np.ndarray, device: torch.device) -> np.ndarray:
    return torch.softmax(predict_logits(Scorer(network, spec).to(device), images, None, device), 1)[:, 1].numpy()


def adapt_and_judge(model, images, labels, groups, site, rest, val, args, seed: int, replay=None,
                    replay_share: float = 0.0) -> dict:
    """One adaptation on ``site`` photos, judged on ``rest`` and on the validation photos."""
    device = select_device()
    start = time.perf_counter()
    tuning = finetune_for_site(model.network, model.spec, images[site], labels[site], groups[site],
                               parse_recipes(args.recipes), args.epochs, args.folds, device, seed, args.bootstrap,
                               replay, replay_share, args.site_model)
    minutes = (time.perf_counter() - start) / 60  # what adapt --finetune spends (without logging)
    # Both site models in every draw, whatever the guard said, at the out-of-fold threshold.
    networks = {"all": lambda: finetune(model.network, model.spec, images[site], labels[site], tuning.recipe,
                                        tuning.epochs, device, seed, replay=replay, replay_share=replay_share),
                "folds": lambda: fold_models(model.network, model.spec, images[site], labels[site], groups[site],
                                             tuning.recipe, tuning.epochs, args.folds, device, seed, replay,
                                             replay_share)}
    oof = fit_calibration("temperature", tuning.oof_logits, labels[site])
    oof_threshold = site_operating_point(Predictions(labels[site], oof.probabilities(tuning.oof_logits),
                                                     groups[site]), args.target, 0).threshold
    before_rest = model.calibration.probabilities(predict_logits(model.scorer("none"), images[rest], None, device))
    val_images, val_labels = val
    row = {"site_model": args.site_model, "site_photos": int(len(site)), "site_melanomas": int(labels[site].sum()),
           "rest_photos": int(len(rest)), "recipe": str(tuning.recipe), "epochs": tuning.epochs,
           "accepted": tuning.accepted, "crossfit_auc_before": tuning.auc_before, "crossfit_auc_after": tuning.auc_after,
           "crossfit_gain": tuning.gain, "crossfit_gain_ci": list(tuning.gain_interval),
           "rest_auc_before": float(roc_auc_score(labels[rest], before_rest)),
           "val_auc_before": float(roc_auc_score(val_labels, probabilities(model.network, model.spec, val_images,
                                                                            device))), "minutes": minutes}
    for arm, build in networks.items():
        network = tuning.network if tuning.accepted and arm == tuning.site_model else build()
        rest_probs = oof.probabilities(predict_logits(Scorer(network, model.spec).to(device), images[rest], None,
                                                      device))
        point = classification_metrics(labels[rest], rest_probs, oof_threshold)
        row.update({f"{arm}_rest_auc": float(roc_auc_score(labels[rest], rest_probs)),
                    f"{arm}_sensitivity": point["sensitivity"], f"{arm}_specificity": point["specificity"],
                    f"{arm}_val_auc": float(roc_auc_score(val_labels, probabilities(network, model.spec, val_images,
                                                                                    device)))})
    row["rest_gain"] = row[f"{args.site_model}_rest_auc"] - row["rest_auc_before"]  # the estimate's truth
    # What adapt serves: the site model (guard passed) or the model at the site's threshold.
    if tuning.accepted:
        served = {k: row[f"{args.site_model}_{k}"] for k in ("rest_auc", "sensitivity", "specificity")}
    else:
        site_probs = model.calibration.probabilities(predict_logits(model.scorer("none"), images[site], None, device))
        threshold = site_operating_point(Predictions(labels[site], site_probs, groups[site]), args.target, 0).threshold
        point = classification_metrics(labels[rest], before_rest, threshold)
        served = {"rest_auc": row["rest_auc_before"], "sensitivity": point["sensitivity"],
                  "specificity": point["specificity"]}
    return {**row, **{f"served_{k}": v for k, v in served.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="crossval run ids")
    parser.add_argument("--sizes", default="100,200,400")
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--recipes", default="all:1e-4,head:1e-3")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--site_model", choices=SITE_MODELS, default="folds", help="what adapt serves")
    parser.add_argument("--replay", type=float, default=0.0, help="also the largest N with this replay share")
    parser.add_argument("--sources", default="", help="only these held-out sources (comma-separated)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    done = {(r["source"], r["size"], r["draw"], r["replay"]) for r in rows}
    for run_id in args.runs:
        for source, child in sorted(children(run_id).items()):
            if args.sources and source not in args.sources.split(","):
                continue
            model, cfg, inputs = child_inputs(child)
            images, labels, groups = (np.asarray(a) for a in inputs["held"])
            val = (np.asarray(inputs["val"][0]), np.asarray(inputs["val"][1]))
            fit_replay = None
            for size in sizes:
                for draw in range(args.draws):
                    variants = [0.0] + ([args.replay] if args.replay and size == max(sizes) else [])
                    for share in variants:
                        if (source, size, draw, share) in done:
                            continue
                        site, rest = draw_site(groups, size, np.random.default_rng(1000 * draw + size))
                        if share and fit_replay is None:
                            data = load_data(cfg, model.spec)
                            fit_replay = (np.asarray(data.data.images[data.fit_idx]), data.data.labels[data.fit_idx])
                        try:
                            row = adapt_and_judge(model, images, labels, groups, site, rest, val, args, draw,
                                                  fit_replay if share else None, share)
                        except DataError as exc:
                            log.warning("%s N=%d draw %d: %s", source, size, draw, exc)
                            continue
                        rows.append({"source": source, "size": size, "draw": draw, "replay": share,
                                     "crossval_run": run_id, "child_run": child, **row})
                        log.info("%s", rows[-1])
                        args.out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
