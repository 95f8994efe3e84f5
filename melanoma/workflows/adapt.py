"""``melanoma adapt``: a clinic adopts a registered model on its own patients.

    melanoma adapt --model models:/melanoma-classifier@champion --site clinic_a --data /data/clinic_a \
        [--unlabelled /data/clinic_a_unlabelled] [--target_sensitivity 0.9]

One MLflow run per adaptation:
1. local validation: the site's labelled photos at the model's own threshold, with 95 % intervals;
2. the site's operating point: the threshold that finds ``target_sensitivity`` of the site's
   melanomas, with the interval of the sensitivity it will reach on the site's next patients (out-
   of-bootstrap: a threshold chosen on each resample, measured on the photos it did not draw) and
   the specificity it costs. With fewer than ``min_melanomas`` the interval is said and the model's
   threshold kept, unless ``force_threshold``;
3. optionally, calibration refitted on the site, and BatchNorm statistics mixed towards the
   site's photos (``adabn``: the share of the site's statistics, 0 = off, 1 = plain AdaBN);
   with ``finetune``, the model fine-tuned on the site's photos where cross-fitting shows a clear
   gain (``melanoma.finetune``; served as the fold models averaged, ``site_model``);
4. a site version: a new version of the registered model with alias ``site-<NAME>``, whose
   settings carry the site's threshold (calibration, BatchNorm statistics) and whose card gains
   a section for the site. It is served and scored like any version.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from dataclasses import dataclass

import markdown
import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score
from torch import nn

from melanoma import metric_names as names
from melanoma import tracking
from melanoma.card import CARD_FILE, CARD_HTML_FILE, version_description
from melanoma.classifier.calibration import fit_calibration
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.engine import checked_engine
from melanoma.classifier.errors import SettingsError
from melanoma.classifier.inference import Scorer, predict_logits, select_device
from melanoma.classifier.logged import load_logged_model
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.config import AdaptSettings, parse_params, settings_params
from melanoma.data.dataset import decode_folder, prepare_dataset
from melanoma.data.layout import read_file
from melanoma.data.records import DataError, missing_classes
from melanoma.data.training_data import load_data
from melanoma.evaluate import Predictions, threshold_for_sensitivity
from melanoma.figures import sets_figure
from melanoma.finetune import finetune_for_site, parse_recipes
from melanoma.reporting import log_set, set_figures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteOperatingPoint:
    """The threshold chosen on a site's photos and what it will give on its next patients."""

    threshold: float
    melanomas: int
    sensitivity_interval: tuple[float, float]  # out-of-bootstrap, 95 %
    specificity: float  # on the site's photos, at the threshold
    specificity_interval: tuple[float, float]


def site_operating_point(site: Predictions, target: float, resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> SiteOperatingPoint:
    """The threshold that finds ``target`` of the site's melanomas, and the interval of the
    sensitivity (and specificity) such a threshold reaches on patients it was not chosen on: on
    each bootstrap resample of whole groups a threshold is chosen and measured on the groups the
    resample left out."""
    labels, probs, groups = np.asarray(site.labels), np.asarray(site.probs), np.asarray(site.groups)
    threshold = threshold_for_sensitivity(labels, probs, target)
    _, group_of = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    sens, spec = [], []
    for _ in range(resamples):
        drawn = np.zeros(group_of.max() + 1, bool)
        drawn[rng.integers(0, len(drawn), len(drawn))] = True
        inside, outside = drawn[group_of], ~drawn[group_of]
        if not np.any(labels[inside] == 1) or not np.any(labels[outside] == 1) or not np.any(labels[outside] == 0):
            continue
        t = threshold_for_sensitivity(labels[inside], probs[inside], target)
        sens.append(np.mean(probs[outside & (labels == 1)] >= t))
        spec.append(np.mean(probs[outside & (labels == 0)] < t))
    tail = (1 - level) / 2 * 100

    def interval(values: list[float]) -> tuple[float, float]:
        return tuple(float(v) for v in np.percentile(values, [tail, 100 - tail])) if values else (math.nan, math.nan)

    return SiteOperatingPoint(threshold, int(np.sum(labels == 1)), interval(sens),
                              float(np.mean(probs[labels == 0] < threshold)), interval(spec))


def batchnorm_layers(model: nn.Module, depth: float = 1.0) -> list[nn.Module]:
    """The first ``depth`` of each network's BatchNorm layers, counted from the input (an
    ensemble's ``nn.ModuleList``: of each member's)."""
    layers = []
    for network in (model if isinstance(model, nn.ModuleList) else [model]):
        found = [m for m in network.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        layers += found[:math.ceil(len(found) * depth)]
    return layers


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray, spec: PreprocessSpec, share: float,
                    depth: float = 1.0, batch_size: int = 64) -> int:
    """Mix BatchNorm running statistics towards those of ``images`` (the site's photos):
    ``share`` of the site's, ``1 - share`` of the model's own (AdaBN at 1), in the first
    ``depth`` of the layers (the rest keep the model's). Weights are untouched. Returns the
    number of layers adapted."""
    layers = batchnorm_layers(model, depth)
    if not layers or share == 0:
        return 0
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    saved = [(m.momentum, m.training) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the site's batches
        m.train()
    scorer = Scorer(model, spec)  # normalisation as the model was trained with
    for start in range(0, len(images), batch_size):
        scorer(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
    for m, (mean, var), (momentum, training) in zip(layers, before, saved):
        m.running_mean.mul_(share).add_(mean, alpha=1 - share)
        m.running_var.mul_(share).add_(var, alpha=1 - share)
        m.momentum = momentum
        m.train(training)
    return len(layers)


def site_section(settings: AdaptSettings, local: dict, point: SiteOperatingPoint | None, chosen: float,
                 reason: str, calibration_refitted: bool, adabn_layers: int, photos: int, scoped: bool) -> str:
    """The model card's section for the site."""
    scope_line = ("In-scope check: the model's, unchanged." if scoped else
                  "In-scope check: **absent** in this version (its network's features differ from those the check "
                  "was fitted on, or the model had none): every answer says so.")
    def figure(metrics: dict, name: str) -> str:
        if name not in metrics:
            return "-"
        return f"{metrics[name]:.3f} ({metrics.get(f'{name}_ci_low', math.nan):.3f}-{metrics.get(f'{name}_ci_high', math.nan):.3f})"

    lines = [f"## Site {settings.site}", "",
             f"Adapted on {datetime.date.today().isoformat()} from `{settings.model}` with `melanoma adapt` "
             f"on {photos} labelled photos of the site ({point.melanomas if point else 0} melanomas).", "",
             "| at the model's own threshold | AUC | sensitivity | specificity |", "|---|---|---|---|",
             f"| the site's photos | {figure(local, 'auc')} | {figure(local, 'sensitivity')} | "
             f"{figure(local, 'specificity')} |", ""]
    if point is not None:
        lines += [f"The site's operating point: threshold {point.threshold:.4f} finds "
                  f"{settings.target_sensitivity:.0%} of the site's melanomas; on the site's next patients such a "
                  f"threshold finds {point.sensitivity_interval[0]:.2f}-{point.sensitivity_interval[1]:.2f} of the "
                  f"melanomas and leaves {point.specificity_interval[0]:.2f}-{point.specificity_interval[1]:.2f} of "
                  f"the benign lesions alone (95 %, out-of-bootstrap).", ""]
    lines += [f"Threshold served: {chosen:.4f} ({reason}).", scope_line,
              f"Calibration {'refitted on the site' if calibration_refitted else 'as trained'}; "
              + (f"BatchNorm statistics: {settings.adabn:.0%} the site's ({adabn_layers} layers"
                 f"{', the first from the input' if settings.adabn_depth < 1 else ''})."
                 if adabn_layers else "BatchNorm statistics as trained."), ""]
    return "\n".join(lines)


def site_finetuning(settings: AdaptSettings, network: nn.Module, spec: PreprocessSpec, site, device: torch.device):
    """Cross-fit the fine-tuning recipes on the site's photos, log what they gave, and fine-tune
    on all of them when the gain is clearly positive (``melanoma.finetune``)."""
    start = time.perf_counter()
    replay = training_photos(settings.model, spec, "fit") if settings.replay else None
    if settings.replay and replay is None:
        raise SettingsError(f"replay needs the training photos of {settings.model}, which cannot be loaded here")
    tuning = finetune_for_site(network, spec, np.asarray(site.images), site.labels, np.asarray(site.groups),
                               parse_recipes(settings.recipes), settings.finetune_epochs, settings.folds, device,
                               settings.seed, settings.bootstrap, replay and replay[:2], settings.replay,
                               settings.site_model)
    for (recipe, epoch), _ in tuning.crossfit.tuned.items():
        mlflow.log_metric(names.finetune_recipe(recipe), tuning.crossfit.auc((recipe, epoch)), step=epoch)
    low, high = tuning.gain_interval
    mlflow.log_metrics({f"{names.FINETUNE}auc_before": tuning.auc_before, f"{names.FINETUNE}auc_after": tuning.auc_after,
                        f"{names.FINETUNE}auc_gain": tuning.gain, f"{names.FINETUNE}auc_gain_ci_low": low,
                        f"{names.FINETUNE}auc_gain_ci_high": high, f"{names.FINETUNE}epochs": tuning.epochs,
                        f"{names.FINETUNE}accepted": float(tuning.accepted),
                        f"{names.FINETUNE}minutes": (time.perf_counter() - start) / 60})
    mlflow.set_tags({"finetune_recipe": str(tuning.recipe), "finetuned": str(tuning.accepted).lower()})
    if not tuning.accepted:
        log.warning("fine-tuning is not clearly better on the site (cross-fitted AUC gain %.3f, 95 %% interval "
                    "%.3f to %.3f): the site version keeps the model's weights", tuning.gain, low, high)
    return tuning


def training_photos(model_uri: str, spec: PreprocessSpec, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The images, labels and sources of the ``split`` ("fit" or "val") of the training run behind
    ``model_uri``; None (with the reason logged) where its data cannot be loaded here."""
    run_id = mlflow.models.get_model_info(model_uri).run_id
    run = mlflow.get_run(run_id) if run_id else None
    if run is None or "data_location" not in run.data.params or "ensemble_runs" in run.data.tags:
        log.warning("%s was not logged by a training run: its training photos are not known here", model_uri)
        return None
    try:
        cfg = parse_params({**run.data.params, "data": run.data.params["data_location"]})
        data = load_data(cfg, spec)
    except (SettingsError, DataError, FileNotFoundError) as exc:
        log.warning("the training data of %s cannot be loaded here (%s)", model_uri, exc)
        return None
    idx = data.fit_idx if split == "fit" else data.val_idx
    return np.asarray(data.data.images[idx]), data.data.labels[idx], np.asarray(data.data.sources[idx]).astype(str)


def measure_forgetting(model_uri: str, before: nn.Module, after: nn.Module, spec: PreprocessSpec,
                       device: torch.device) -> dict[str, dict[str, float]]:
    """AUC of the base and the fine-tuned model on each training source's validation photos (what
    fine-tuning may have cost where the model came from), logged; {} where they cannot be loaded."""
    photos = training_photos(model_uri, spec, "val")
    if photos is None:
        return {}
    images, labels, sources = photos
    probs = {name: torch.softmax(predict_logits(Scorer(net, spec).to(device), images, None, device), 1)[:, 1].numpy()
             for name, net in (("base", before), ("site", after))}
    table = {}
    for source in sorted(set(sources)):
        part = sources == source
        if len(set(labels[part])) == 2:
            table[source] = {name: float(roc_auc_score(labels[part], p[part])) for name, p in probs.items()}
            mlflow.log_metrics({f"{names.FORGETTING.format(source)}auc_{name}": v for name, v in table[source].items()})
    return table


def finetune_section(settings: AdaptSettings, tuning, forgetting: dict[str, dict[str, float]], photos: int) -> str:
    """The card's lines on fine-tuning: what was tried, what it gave, what it cost."""
    low, high = tuning.gain_interval
    replayed = f", {settings.replay:.0%} of each batch from the training sources' photos" if settings.replay else ""
    lines = ["### Fine-tuning on the site's photos", "",
             f"Cross-fitted on the site's {photos} labelled photos ({settings.folds} folds, a patient's or lesion's "
             f"photos in one; recipes {settings.recipes}, up to {settings.finetune_epochs} epochs, flips, "
             f"class-weighted loss{replayed}). "
             f"Chosen: `{tuning.recipe}` for {tuning.epochs} epochs. Out-of-fold AUC on the site: "
             f"{tuning.auc_before:.3f} before, {tuning.auc_after:.3f} after (gain {tuning.gain:+.3f}, 95 % "
             f"{low:+.3f} to {high:+.3f}; the recipe was chosen on these scores, so the gain is slightly "
             "optimistic).", ""]
    if not tuning.accepted:
        return "\n".join(lines + ["**Not fine-tuned**: the gain's interval reaches zero, so this version keeps the "
                                  "model's weights and adapts its threshold alone.", ""])
    if tuning.site_model == "folds":
        lines += [f"This version averages the {settings.folds} fold models of the cross-fitting (each fine-tuned on "
                  f"the other folds' photos with that recipe): the models whose out-of-fold scores give its "
                  "calibration and threshold.", ""]
    else:
        lines += [f"This version was fine-tuned on all {photos} photos with that recipe; its calibration and "
                  "threshold come from the out-of-fold scores of the fold models.", ""]
    if forgetting:
        lines += ["| training source (validation photos) | AUC before | AUC after |", "|---|---|---|",
                  *[f"| {s} | {v['base']:.3f} | {v['site']:.3f} |" for s, v in forgetting.items()], ""]
    else:
        lines += ["What fine-tuning cost on the training sources was not measured: their photos are not available "
                  "here.", ""]
    return "\n".join(lines)


def run_adaptation(settings: AdaptSettings) -> dict:
    """Adapt ``settings.model`` to a site inside the active MLflow run; returns the summary."""
    settings.validate()
    base = load_logged_model(settings.model)  # this process's own copy
    spec = base.spec
    site = prepare_dataset(settings.data, spec, require_train=False)
    tracking.tag_experiment()
    mlflow.set_tags({"adaptation": "true", "site": settings.site, "model_uri": settings.model})
    tracking.log_params(settings_params(settings))
    device = select_device()  # fine-tuning and its cross-fitting run on a GPU where there is one
    model = base.network.to(device).float()
    adabn_layers = 0
    if settings.adabn:
        unlabelled = decode_folder(settings.unlabelled, spec) if settings.unlabelled else np.asarray(site.images)
        adabn_layers = adapt_batchnorm(model, unlabelled, spec, settings.adabn, settings.adabn_depth)
        mlflow.log_metrics({"adabn_photos": len(unlabelled), "adabn_layers": adabn_layers})
    # The in-scope check holds while the network computes what it was fitted on: not after AdaBN.
    scope = base.scope if not adabn_layers else None
    engine, graph, _ = checked_engine(Scorer(model, spec, base.tta, scope), np.asarray(site.images[:256]), device)
    logits = engine.logits(np.asarray(site.images))
    labels, groups = site.labels, np.asarray(site.groups)

    local = log_set("site", names.SITE, labels, logits, base.calibration, base.threshold, groups,
                    settings.bootstrap, settings.seed)
    calibration, member_names = base.calibration, base.names
    tuning, forgetting = None, {}
    if settings.finetune:
        tuning = site_finetuning(settings, model, spec, site, device)
        if tuning.accepted:
            forgetting = measure_forgetting(settings.model, model, tuning.network, spec, device)
            model, scope = tuning.network, None  # new features: the training photos' check no longer holds
            if tuning.site_model == "folds":
                member_names = base.names * settings.folds
            engine, graph, _ = checked_engine(Scorer(model, spec, base.tta), np.asarray(site.images[:256]), device)
            # The site model's calibration and threshold come from scores of photos the scoring
            # model never trained on: the cross-fitted ones of the chosen recipe.
            logits = tuning.oof_logits
            calibration = fit_calibration(calibration.method if calibration.method != "none" else "temperature",
                                          logits, labels)
    if settings.recalibrate and not (tuning and tuning.accepted):
        if missing_classes(labels):
            raise DataError(f"the site's photos have no {missing_classes(labels)[0]} images: calibration cannot "
                            "be refitted on them")
        calibration = fit_calibration(calibration.method if calibration.method != "none" else "temperature",
                                      logits, labels)
    site_preds = Predictions(labels, calibration.probabilities(logits), groups)
    point, chosen, rule, reason = None, base.threshold, base.rule, "the model's threshold"
    if missing_classes(labels):
        reason = f"the model's threshold: the site's photos have no {' or '.join(missing_classes(labels))} images"
        log.warning("%s: no site threshold can be chosen (%s); keeping the model's threshold",
                    settings.data, reason)
    else:
        point = site_operating_point(site_preds, settings.target_sensitivity, settings.bootstrap, settings.seed)
        low, high = point.sensitivity_interval
        if point.melanomas < settings.min_melanomas and not settings.force_threshold:
            reason = (f"the model's threshold: the site has {point.melanomas} melanomas, fewer than "
                      f"{settings.min_melanomas}; a threshold chosen on them finds {low:.2f}-{high:.2f} of the next "
                      "patients' melanomas (95 %)")
            log.warning("%s; pass --force_threshold true to use it anyway", reason)
        else:
            chosen, reason = point.threshold, f"chosen on the site for {settings.target_sensitivity:.0%} sensitivity"
            rule = ThresholdRule("site", settings.target_sensitivity, settings.target_sensitivity)
        mlflow.log_metrics({"site_threshold": point.threshold, "site_melanomas": point.melanomas,
                            "site_sensitivity_next_ci_low": low, "site_sensitivity_next_ci_high": high,
                            "site_specificity_at_site_threshold": point.specificity,
                            "site_specificity_next_ci_low": point.specificity_interval[0],
                            "site_specificity_next_ci_high": point.specificity_interval[1]})
    served = set_figures(site_preds, chosen, settings.bootstrap, settings.seed)
    tracking.log_metrics(served, prefix=names.SITE_SERVED)
    tracking.log_figure(sets_figure({"model's threshold": local, "site's served threshold": served}),
                        "site/operating_points.png")
    tracking.log_threshold(chosen, rule)

    section = site_section(settings, local, point, chosen, reason, settings.recalibrate, adabn_layers, len(labels),
                           scope is not None)
    if tuning is not None:
        section += "\n" + finetune_section(settings, tuning, forgetting, len(labels))
    site_settings = {**{k: v for k, v in base.settings.items() if k not in ("threshold", "calibration")},
                     "site": {"name": settings.site, "adapted_from": settings.model, "date": datetime.date.today().isoformat(),
                              "photos": int(len(labels)), "threshold_reason": reason, "adabn": settings.adabn,
                              "adabn_depth": settings.adabn_depth,
                              "finetuned": None if tuning is None or not tuning.accepted else {
                                  "recipe": str(tuning.recipe), "epochs": tuning.epochs, "folds": settings.folds,
                                  "site_model": tuning.site_model,
                                  "replay": settings.replay, "crossfit_auc_gain": tuning.gain}}}
    example_bytes = read_file(site.source, site.paths[0])
    model_uri = tracking.log_classifier(model.cpu(), member_names, spec, chosen, rule, example_bytes, calibration, graph,
                                        site_settings, scope)
    mlflow.set_tag("site_model_uri", model_uri)
    trained = trained_card(settings.model)
    card_text = (trained + "\n\n" + section).strip()
    mlflow.log_text(card_text, CARD_FILE)  # the page (melanoma app) shows the card of the model's run
    mlflow.log_text(markdown.markdown(card_text, extensions=["tables"]), CARD_HTML_FILE)
    summary = {"site": settings.site, "threshold": chosen, "threshold_reason": reason, "model_uri": model_uri,
               **{f"site_{k}": v for k, v in local.items() if k in ("auc", "sensitivity", "specificity", "count")}}
    if tuning is not None:
        summary.update({"finetuned": tuning.accepted, "finetune_recipe": str(tuning.recipe),
                        "finetune_epochs": tuning.epochs, "site_model": tuning.site_model,
                        "crossfit_auc_before": tuning.auc_before,
                        "crossfit_auc_after": tuning.auc_after, "crossfit_auc_gain_ci": list(tuning.gain_interval)})
    if settings.register:
        # The version's description leads with the site's section: a long card is cut at its end.
        summary["registered"] = register_site_version(settings, model_uri, (section + "\n\n" + trained).strip())
    return summary


def trained_card(model_uri: str) -> str:
    """The card of the run that logged ``model_uri`` ("" for a model logged without one)."""
    run_id = mlflow.models.get_model_info(model_uri).run_id
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{CARD_FILE}") if run_id else ""
    except MlflowException:
        log.warning("%s has no model card; the site version's card holds the site's section alone", model_uri)
        return ""


def register_site_version(settings: AdaptSettings, model_uri: str, description: str) -> str:
    """The site's model as a new version of the registered model, alias ``site-<NAME>``, with
    ``description`` (the site's section, then the adapted model's card)."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, settings.registered_model,
                                    tags={"site": settings.site, "adapted_from": settings.model})
    run_id = mlflow.active_run().info.run_id
    client.update_model_version(settings.registered_model, version.version,
                                description=version_description(description, run_id))
    client.set_registered_model_alias(settings.registered_model, f"site-{settings.site}", version.version)
    log.info("registered %s version %s as @site-%s", settings.registered_model, version.version, settings.site)
    return f"models:/{settings.registered_model}@site-{settings.site}"
