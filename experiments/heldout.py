"""Re-scoring the held-out sources of finished cross-source validations, without retraining.

    python -m experiments.heldout views --runs CROSSVAL_ID [CROSSVAL_ID ...] [--views none,flip] --out docs/crossval_views_cpu.json
    python -m experiments.heldout rules --runs CROSSVAL_ID --out docs/crossval4_rules_cpu.json
    python -m experiments.heldout sites --runs CROSSVAL_ID [--adabn_photos 200 --adabn_draws 3] --out docs/site_adaptation_cpu.json

``views``: each crossval run's held-out children scored with each test-time augmentation, and
(with several runs, validated on one split) every combination of them as an ensemble; per source the AUC and what the
validation and crossval threshold rules give (``melanoma.workflows.crossval``).

``rules``: the threshold rules on each held-out source of one crossval run: the validation rule,
the crossval rule (the mean of the other sources' needed shares of validation melanomas) and the
strictest one (their maximum), each source's share chosen without it.

``sites``: each held-out source treated as a new clinic that adopts the model trained without
it (``melanoma adapt``): N labelled site photos drawn at random (many draws), the site's
threshold chosen on them, measured on the rest of the site; and BatchNorm statistics mixed
towards the site's photos, measured by the AUC and the sensitivity at the model's threshold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import torch

from melanoma.classifier.calibration import fit_calibration
from melanoma.classifier.engine import checked_engine
from melanoma.classifier.inference import TTA_VIEWS, Scorer
from melanoma.classifier.logged import load_logged_model
from melanoma.config import parse_params
from melanoma.data.training_data import load_data
from melanoma.evaluate import Predictions, classification_metrics, threshold_for_sensitivity
from melanoma.workflows.adapt import adapt_batchnorm, site_operating_point
from melanoma.workflows.crossval import needed_shares, rule_results
from melanoma.workflows.training import TrainingReport

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def children(run_id: str) -> dict[str, str]:
    """{held-out source: child run id} of a crossval run."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    found = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {r.data.tags["crossval_heldout"]: r.info.run_id for r in found if "crossval_heldout" in r.data.tags}


def child_inputs(child_id: str):
    """The child's network and settings, and its validation and held-out images, labels, groups."""
    classifier = load_logged_model(f"runs:/{child_id}/model")
    cfg = parse_params(mlflow.MlflowClient().get_run(child_id).data.params)
    data = load_data(cfg, classifier.spec)
    d = data.data
    return classifier, cfg, {"val": (d.images[data.val_idx], d.labels[data.val_idx], d.groups[data.val_idx]),
                             "held": (d.images[data.holdout_idx], d.labels[data.holdout_idx], d.groups[data.holdout_idx])}


def logits(model: torch.nn.Module, spec, tta: str, images: np.ndarray) -> torch.Tensor:
    engine, _, _ = checked_engine(Scorer(model, spec, tta), np.asarray(images[:64]), CPU)
    return engine.logits(np.asarray(images))


def report_of(val_logits, held_logits, inputs, method: str) -> TrainingReport:
    """Calibrated on validation (as a run is), the validation and held-out predictions."""
    (_, val_labels, val_groups), (_, held_labels, held_groups) = inputs["val"], inputs["held"]
    calibration = fit_calibration(method, val_logits, val_labels)
    return TrainingReport({}, Predictions(val_labels, calibration.probabilities(val_logits), val_groups),
                          Predictions(held_labels, calibration.probabilities(held_logits), held_groups))


def summarize(reports: dict[str, TrainingReport], target: float) -> dict:
    rules = rule_results(reports, target, resamples=200, seed=0)
    rows = {}
    for source, report in reports.items():
        held = report.holdout
        row = {"auc": classification_metrics(held.labels, held.probs).get("auc")}
        for rule, values in rules.get(source, {}).items():
            row.update({f"{rule}_rule_{k}": values[k] for k in ("sensitivity", "specificity", "threshold")})
        rows[source] = row
    aucs = [r["auc"] for r in rows.values() if r["auc"] is not None]
    return {"sources": rows, "worst_auc": min(aucs), "mean_auc": float(np.mean(aucs))}


def screen_views(run_ids: list[str], views: list[str]) -> dict:
    """Each test-time augmentation in ``views`` of each run's children, and the runs' ensembles."""
    results, by_source = {}, {}
    for run_id in run_ids:
        for source, child in children(run_id).items():
            classifier, cfg, inputs = child_inputs(child)
            for tta in views:
                pair = (logits(classifier.network, classifier.spec, tta, inputs["val"][0]),
                        logits(classifier.network, classifier.spec, tta, inputs["held"][0]))
                by_source.setdefault((run_id, tta), {})[source] = (pair, inputs, cfg)
    for (run_id, tta), sources in by_source.items():
        reports = {s: report_of(*pair, inputs, cfg.calibration) for s, (pair, inputs, cfg) in sources.items()}
        results[f"{run_id}:{tta}"] = summarize(reports, next(iter(sources.values()))[2].target_sensitivity)
        log.info("%s tta=%s: worst AUC %.4f", run_id, tta, results[f"{run_id}:{tta}"]["worst_auc"])
    # Ensembles of every combination of the runs: logits averaged over their children, per view setting.
    for size in range(2, len(run_ids) + 1):
        for combination in itertools.combinations(run_ids, size):
            for tta in views:
                reports = {}
                for source in by_source[(combination[0], tta)]:
                    members = [by_source[(r, tta)][source] for r in combination]
                    if any(not np.array_equal(m[1]["val"][2], members[0][1]["val"][2]) for m in members):
                        raise ValueError(f"runs {combination} validated on other images: an ensemble's threshold "
                                         "would be chosen on images a member trained on (use one --split_seed)")
                    val = torch.stack([m[0][0] for m in members]).mean(0)
                    held = torch.stack([m[0][1] for m in members]).mean(0)
                    reports[source] = report_of(val, held, members[0][1], members[0][2].calibration)
                results[f"ensemble:{'+'.join(combination)}:{tta}"] = summarize(reports, 0.9)
                log.info("ensemble %s tta=%s: worst AUC %.4f", combination, tta,
                         results[f"ensemble:{'+'.join(combination)}:{tta}"]["worst_auc"])
    return results


def screen_rules(run_id: str) -> dict:
    """Each held-out source's sensitivity and specificity under three threshold rules, the
    travelling shares computed from the other sources only."""
    reports, target = {}, 0.9
    for source, child in children(run_id).items():
        classifier, cfg, inputs = child_inputs(child)
        pair = (logits(classifier.network, classifier.spec, "none", inputs["val"][0]),
                logits(classifier.network, classifier.spec, "none", inputs["held"][0]))
        reports[source], target = report_of(*pair, inputs, cfg.calibration), cfg.target_sensitivity
    needed = needed_shares(reports, target)
    results = {"target": target, "needed_shares": needed, "sources": {}}
    for source, report in reports.items():
        others = [share for other, share in needed.items() if other != source]
        shares = {"validation": target, "crossval_mean": float(np.mean(others)), "crossval_max": float(np.max(others))}
        rows = {}
        for rule, share in shares.items():
            threshold = threshold_for_sensitivity(report.val.labels, report.val.probs, share)
            m = classification_metrics(report.holdout.labels, report.holdout.probs, threshold)
            rows[rule] = {"validation_sensitivity": share, "sensitivity": m["sensitivity"],
                          "specificity": m["specificity"]}
        results["sources"][source] = rows
        log.info("%s: %s", source, rows)
    return results


def site_draws(site: Predictions, sizes: tuple[int, ...], draws: int, target: float, model_threshold: float,
               min_melanomas: int, seed: int = 0) -> dict:
    """N labelled photos of a site drawn at random, its threshold chosen on them (the adapt
    rule: kept at the model's with fewer than ``min_melanomas``), measured on the rest."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        rows = []
        for _ in range(draws):
            drawn = rng.permutation(len(site.labels))[:n]
            rest = np.setdiff1d(np.arange(len(site.labels)), drawn)
            sample = Predictions(site.labels[drawn], site.probs[drawn], site.groups[drawn])
            melanomas = int(sample.labels.sum())
            site_t = site_operating_point(sample, target, resamples=0).threshold if melanomas else model_threshold
            rule_t = site_t if melanomas >= min_melanomas else model_threshold
            for name, t in (("site", site_t), ("rule", rule_t)):
                m = classification_metrics(site.labels[rest], site.probs[rest], t)
                rows.append({"threshold": name, "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                             "melanomas": melanomas})
        summary = {}
        for name in ("site", "rule"):
            sens = np.array([r["sensitivity"] for r in rows if r["threshold"] == name])
            spec = np.array([r["specificity"] for r in rows if r["threshold"] == name])
            summary[name] = {"share_sensitivity_in_0.85_0.95": float(np.mean((sens >= 0.85) & (sens <= 0.95))),
                             "sensitivity_median": float(np.median(sens)),
                             "sensitivity_p5_p95": [float(np.percentile(sens, 5)), float(np.percentile(sens, 95))],
                             "specificity_median": float(np.median(spec))}
        summary["melanomas_median"] = float(np.median([r["melanomas"] for r in rows]))
        out[n] = summary
    return out


ADABN_VARIANTS = {"adabn_full": (1.0, 1.0), "adabn_half": (0.5, 1.0), "adabn_quarter": (0.25, 1.0),
                  "adabn_first_third": (1.0, 1 / 3)}  # name: (share of the site's statistics, depth)


def screen_sites(run_id: str, sizes=(50, 100, 200, 400), draws: int = 200, adabn_photos: int = 0,
                 adabn_draws: int = 1, seed: int = 0) -> dict:
    """Each held-out source as a new site: threshold draws, and every AdaBN variant measured by
    the AUC and the figures at the model's threshold. With ``adabn_photos`` the statistics come
    from that many random site photos (``adabn_draws`` times) and are measured on the rest."""
    rng = np.random.default_rng(seed)
    results = {}
    for source, child in children(run_id).items():
        classifier, cfg, inputs = child_inputs(child)
        images, labels, groups = inputs["held"]
        if not np.any(labels == 1):
            continue
        base_logits = logits(classifier.network, classifier.spec, "none", images)
        site = Predictions(labels, classifier.calibration.probabilities(base_logits), groups)
        at_model = classification_metrics(labels, site.probs, classifier.threshold)
        row = {"photos": len(labels), "melanomas": int(labels.sum()),
               "unadapted": {k: at_model[k] for k in ("auc", "sensitivity", "specificity")}}
        if draws:
            row["draws"] = site_draws(site, sizes, draws, cfg.target_sensitivity, classifier.threshold, 30)
        state = {k: v.clone() for k, v in classifier.network.state_dict().items()}
        for name, (share, depth) in ADABN_VARIANTS.items():
            changes = []
            for _ in range(adabn_draws if adabn_photos else 1):
                used = rng.permutation(len(labels))[:adabn_photos] if adabn_photos else np.arange(len(labels))
                rest = np.setdiff1d(np.arange(len(labels)), used) if adabn_photos else used
                classifier.network.load_state_dict(state)
                adapt_batchnorm(classifier.network, images[np.sort(used)], classifier.spec, share, depth)
                adapted = classifier.calibration.probabilities(
                    logits(classifier.network, classifier.spec, "none", images[rest]))
                before = classification_metrics(labels[rest], site.probs[rest], classifier.threshold)
                after = classification_metrics(labels[rest], adapted, classifier.threshold)
                changes.append({f"{k}_change": after[k] - before[k] for k in ("auc", "sensitivity", "specificity")})
            row[name] = {k: float(np.mean([c[k] for c in changes])) for k in changes[0]}
            row[name]["auc_change_range"] = [min(c["auc_change"] for c in changes), max(c["auc_change"] for c in changes)]
            log.info("%s %s: AUC change %+.4f", source, name, row[name]["auc_change"])
        classifier.network.load_state_dict(state)
        results[source] = row
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("views", "rules", "sites"))
    parser.add_argument("--runs", nargs="+", required=True, help="crossval run ids")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--views", default="none,flip", help=f"test-time views to screen, of {', '.join(TTA_VIEWS)}")
    parser.add_argument("--adabn_photos", type=int, default=0, help="sites: BatchNorm statistics from this many photos")
    parser.add_argument("--adabn_draws", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mode == "views":
        results = screen_views(args.runs, args.views.split(","))
    elif args.mode == "rules":
        results = screen_rules(args.runs[0])
    else:
        results = screen_sites(args.runs[0], draws=args.draws, adabn_photos=args.adabn_photos,
                               adabn_draws=args.adabn_draws)
    text = json.dumps(results, indent=2, default=float)
    if args.out:
        args.out.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
