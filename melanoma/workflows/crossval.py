"""Cross-source validation: how a model does at a clinic it has never seen.

    melanoma crossval --data melanoma10k,ham10000,isic2017 [any training flag]
    mlflow run . -e crossval -P data=... --env-manager local

For each source of the data a child run trains on the other sources and is scored on this one
(an ordinary training run with ``holdout_source``). The parent run logs, per source,
``heldout_<source>_{auc,sensitivity,specificity}`` with 95 % intervals (whole lesions resampled),
``crossval_mean_auc`` and ``crossval_worst_auc``, and what each threshold rule gives there.

The travelling threshold. The validation rule takes the threshold that finds
``target_sensitivity`` of the in-source validation melanomas; at a source it never saw, a model
finds fewer. Each child measures how many fewer: the share of its own validation melanomas it
must find to find the target share on the source it never saw. The crossval rule operates at the
mean of those shares (``travel_sensitivity``): the final model, trained on every source, takes
the threshold that finds that share of its own validation melanomas. Each rule is judged per
source without looking at that source: source k's share comes from the other children alone.
"""

from __future__ import annotations

import dataclasses
import logging

import mlflow
import numpy as np

from melanoma import metric_names as names
from melanoma import tracking
from melanoma.card import write_card
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.errors import SettingsError
from melanoma.config import CrossvalSettings, TrainConfig, settings_params
from melanoma.data.combine import load_datasets
from melanoma.data.dataset import cache_dir
from melanoma.data.demo import demo_dataset
from melanoma.data.records import DataError, missing_classes
from melanoma.evaluate import Predictions, threshold_for_sensitivity
from melanoma.figures import crossval_figure, sets_figure
from melanoma.metric_names import with_prefix
from melanoma.reporting import set_figures
from melanoma.workflows.training import TrainingReport, run_training

log = logging.getLogger(__name__)


def needed_validation_sensitivity(val: Predictions, held: Predictions, target: float) -> float:
    """The share of the validation melanomas a model must find to find ``target`` of the
    held-out source's melanomas."""
    threshold = threshold_for_sensitivity(held.labels, held.probs, target)
    return float(np.mean(val.probs[val.labels == 1] >= threshold))


def needed_shares(children: dict[str, TrainingReport], target: float) -> dict[str, float]:
    """Each held-out source's needed share (sources without melanomas have none)."""
    return {source: needed_validation_sensitivity(report.val, report.holdout, target)
            for source, report in children.items() if np.any(report.holdout.labels == 1)}


def rule_results(children: dict[str, TrainingReport], target: float, resamples: int,
                 seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """For each held-out source with melanomas, what each threshold rule gives there:
    ``{source: {"validation": metrics, "crossval": metrics}}``. The crossval rule's share for
    source k is the mean of the other sources' needed shares."""
    needed = needed_shares(children, target)
    out = {}
    for source, report in children.items():
        others = [share for other, share in needed.items() if other != source]
        if source not in needed or not others:
            continue
        shares = {"validation": target, "crossval": float(np.mean(others))}
        out[source] = {rule: {**set_figures(report.holdout, threshold_for_sensitivity(report.val.labels,
                                                                                     report.val.probs, share),
                                            resamples, seed), "validation_sensitivity": share}
                       for rule, share in shares.items()}
    return out


def travel_sensitivity(children: dict[str, TrainingReport], target: float) -> float:
    """The crossval rule's share of validation melanomas, from every held-out source with melanomas."""
    shares = list(needed_shares(children, target).values())
    if not shares:
        raise DataError("no held-out source has malignant images: the crossval threshold cannot be chosen")
    return float(np.mean(shares))


def check_sources(cfg: TrainConfig) -> list[str]:
    """The data's sources, each of which can be held out; a clear error or warning where not."""
    if cfg.holdout_source:
        raise SettingsError("crossval holds out every source in turn: leave holdout_source empty")
    demo = {"demo": demo_dataset(cfg.demo_size, cfg.seed, cache_dir())}
    data = load_datasets(cfg.data, cfg.preprocess_spec(), label_map=cfg.label_map, locations=demo)
    sources = sorted(str(s) for s in set(data.sources))
    if len(sources) < 2:
        raise DataError(f"crossval needs at least two sources to hold out in turn; {cfg.data!r} has one: "
                        f"{sources[0]}. Give several datasets (data=a,b,c) or a metadata CSV with a source column")
    for source in sources:
        held = data.sources == source
        for name in missing_classes(data.labels[~held])[:1]:
            raise DataError(f"without source {source!r} the training data has no {name} images: it cannot be held out")
        for name in missing_classes(data.labels[held]):
            log.warning("held-out source %r has no %s images: its AUC is undefined, only its %s is reported",
                        source, name, "specificity" if name == "malignant" else "sensitivity")
    return sources


def log_summary(children: dict[str, TrainingReport], rules: dict, cfg: TrainConfig) -> dict[str, float]:
    """The parent run's metrics and figures; returns the metrics."""
    metrics: dict[str, float] = {}
    for source, report in children.items():
        at_own = set_figures(report.holdout, report.summary["threshold"], cfg.bootstrap, cfg.seed)
        metrics.update({f"{names.CROSSVAL_HELDOUT.format(source)}{k}": v for k, v in at_own.items()})
        for rule, values in rules.get(source, {}).items():
            metrics.update({f"{names.CROSSVAL_HELDOUT.format(source)}{names.RULE.format(rule)}{k}": v for k, v in values.items()
                            if k in ("sensitivity", "specificity", "threshold", "validation_sensitivity")
                            or k.startswith(("sensitivity_ci", "specificity_ci"))})
    aucs = {s: metrics[f"{names.CROSSVAL_HELDOUT.format(s)}auc"] for s in children if f"{names.CROSSVAL_HELDOUT.format(s)}auc" in metrics}
    if aucs:
        metrics["crossval_mean_auc"] = float(np.mean(list(aucs.values())))
        metrics["crossval_worst_auc"] = float(min(aucs.values()))
    for rule in ("validation", "crossval"):
        rows = [r[rule] for r in rules.values()]
        if rows:
            metrics[f"crossval_{names.RULE.format(rule)}worst_sensitivity"] = min(r["sensitivity"] for r in rows)
            metrics[f"crossval_{names.RULE.format(rule)}worst_specificity"] = min(r["specificity"] for r in rows)
    tracking.log_metrics(metrics)
    tracking.log_figure(crossval_figure({s: with_prefix(metrics, names.CROSSVAL_HELDOUT.format(s)) for s in children}),
                        "crossval/heldout_auc.png")
    if rules:
        tracking.log_figure(sets_figure({f"{s}: {rule} rule": v for s, r in rules.items() for rule, v in r.items()}),
                            "crossval/threshold_rules.png")
    tracking.log_json({"rules": rules, "metrics": metrics}, "crossval/crossval.json")
    return metrics


def run_crossval(cfg: TrainConfig, settings: CrossvalSettings = CrossvalSettings()) -> dict:
    """Leave each source out in turn (child runs of the active run), log the summary, and with
    ``settings.final`` train the model on every source with the chosen threshold rule; returns
    the summary (the final model's URI as ``model_uri``)."""
    cfg.validate()
    settings.validate()
    sources = check_sources(cfg)
    parent = mlflow.active_run().info.run_id
    tracking.tag_experiment()
    mlflow.set_tags({"crossval": "true", "crossval_sources": ",".join(sources),
                     "synthetic_data": str("demo" in cfg.data.split(",")).lower()})
    tracking.log_params({**settings_params(cfg), **settings_params(settings)})
    children = {}
    for source in sources:
        with mlflow.start_run(run_name=f"heldout-{source}", parent_run_id=parent, nested=True):
            mlflow.set_tag("crossval_heldout", source)
            children[source] = run_training(dataclasses.replace(cfg, holdout_source=source), checkpoints=False)
    rules = rule_results(children, cfg.target_sensitivity, cfg.bootstrap, cfg.seed)
    summary = log_summary(children, rules, cfg)
    travel = travel_sensitivity(children, cfg.target_sensitivity)
    mlflow.log_metric("travel_sensitivity", travel)
    if settings.final:
        rule = (ThresholdRule("crossval", cfg.target_sensitivity, travel) if settings.threshold_rule == "crossval"
                else ThresholdRule.validation(cfg.target_sensitivity))
        with mlflow.start_run(run_name="all-sources", parent_run_id=parent, nested=True) as final:
            mlflow.set_tags({"crossval_final": "true", "crossval_sources": ",".join(sources)})
            final_report = run_training(cfg, checkpoints=False, rule=rule)
            # What the rule gave at each held-out source: the final model's card quotes it.
            tracking.log_metrics({f"{names.CROSSVAL_QUOTED.format(s)}{k}": v for s in sources
                                  for k, v in with_prefix(summary, names.CROSSVAL_HELDOUT.format(s)).items()})
        write_card(final.info.run_id)
        mlflow.set_tags({"model_uri": final_report.summary["model_uri"], "final_run_id": final.info.run_id})
        summary.update({"model_uri": final_report.summary["model_uri"], "final_run_id": final.info.run_id,
                        "final_threshold": final_report.summary["threshold"]})
    return {"travel_sensitivity": travel, "threshold_rule": settings.threshold_rule, **summary}
