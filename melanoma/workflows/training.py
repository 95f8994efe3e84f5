"""One training run from settings to a logged model, inside the active MLflow run.

data -> split -> fit (per-epoch metrics) -> calibration and operating point on validation ->
every set reported with intervals (validation, test, external) -> figures -> logged pyfunc
model -> model card.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from melanoma import card, tracking
from melanoma import metric_names as names
from melanoma.audit import audit_dataset, audit_figure, public_report
from melanoma.checkpoint import RunCheckpoints
from melanoma.classifier.calibration import fit_calibration
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.engine import checked_engine
from melanoma.classifier.gradcam import ensemble_gradcam, fit_longest_side, overlay_on_photo, side_by_side
from melanoma.classifier.inference import Scorer, scope_features, select_device, to_model_input
from melanoma.classifier.models import build_model, gradcam_layer, has_pretrained_weights
from melanoma.classifier.preprocessing import PreprocessSpec, decode_for_model, model_region, preprocess
from melanoma.classifier.scope import (
    IN_SCOPE_SHARE,
    ScopeModel,
    colourfulness,
    fit_scope,
    learn_boundary,
    threshold_for_sources,
)
from melanoma.config import TrainConfig, settings_params
from melanoma.data.dataset import PreparedData, cache_dir, decode_folder
from melanoma.data.demo import demo_dataset
from melanoma.data.layout import read_file
from melanoma.data.out_of_scope import generated_pictures
from melanoma.data.training_data import TrainingData, load_data
from melanoma.evaluate import (
    Predictions,
    classification_metrics,
    external_names,
    operating_point,
    score_folder,
    source_metrics,
)
from melanoma.figures import confusion_figure, gradcam_panel, history_figure, sets_figure
from melanoma.reporting import dataset_params, log_set
from melanoma.train import EpochCallback, fit_data

log = logging.getLogger(__name__)

PANEL_SIDE = 224  # Grad-CAM examples in a run's figures: the photo's longest side, in pixels
AUDIT_METRICS = ("border_probe_auc", "exact_duplicate_pairs", "near_duplicate_pairs", "cross_split_duplicate_pairs",
                 "conflicting_label_pairs", "copies_across_datasets", "copies_within_datasets")


def gradcam_examples(model: torch.nn.Module, data: PreparedData, idx: np.ndarray, probs: np.ndarray,
                     threshold: float, spec: PreprocessSpec, per_class: int, seed: int, device: torch.device):
    """Grad-CAM figure for ``per_class`` random images of each class among ``idx`` (``probs``
    are theirs), each shown on its original photo at a readable size. ``model``: one network,
    or an ensemble's ``nn.ModuleList``."""
    rng = np.random.default_rng(seed)
    labels = data.labels[idx]
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in (0, 1)])
    x = to_model_input(torch.from_numpy(np.asarray(data.images[idx[chosen]])), spec, device)
    members = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
    layers = [gradcam_layer(m, spec.img_size, spec.channels) for m in members]
    maps = ensemble_gradcam(members, layers, x).cpu().numpy()
    panels = []
    for i, heat in zip(chosen, maps):
        image = decode_for_model(read_file(data.locations[idx[i]], data.paths[idx[i]]), spec)
        photo = fit_longest_side(image, PANEL_SIDE)
        panels.append(side_by_side(photo, overlay_on_photo(photo, heat, model_region(image, spec), PANEL_SIDE)))
    return gradcam_panel(panels, labels[chosen], probs[chosen], threshold)


@functools.lru_cache(maxsize=4)
def cached_audit(datasets: str, label_map: str, seed: int, digest: str, demo: str) -> dict:
    """One audit per dataset and process: a search's trials share it instead of repeating it."""
    return audit_dataset(datasets, seed=seed, label_map=label_map, locations={"demo": Path(demo)})


def log_audit(cfg: TrainConfig, digest: str, demo: Path) -> None:
    """The data audit of every training run: metrics, verdict, the source x class table, JSON and figure."""
    report = cached_audit(cfg.data, cfg.label_map, cfg.seed, digest, str(demo))
    tracking.log_metrics({k: report[k] for k in AUDIT_METRICS}, prefix=names.AUDIT)
    for source, row in report["sources"].items():
        tracking.log_metrics({k: v for k, v in row.items() if k != "warning"}, prefix=names.AUDIT_SOURCE.format(source))
    mlflow.set_tag("audit_verdict", report["verdict"][:5000])
    tracking.log_json(public_report(report), "audit/audit.json")
    tracking.log_figure(audit_figure(report), "audit/audit.png")


def log_report_figures(model: torch.nn.Module, data: PreparedData, idx: np.ndarray, probs: np.ndarray, split: str,
                       threshold: float, cfg: TrainConfig, spec: PreprocessSpec, device: torch.device) -> None:
    """Confusion matrices at 0.5 and at the operating threshold, and Grad-CAM examples."""
    labels = data.labels[idx]
    for name, t in (("0.5", 0.5), ("operating", threshold)):
        tracking.log_figure(confusion_figure(labels, probs, t, f"{split} set, {name} threshold"),
                            f"evaluation/confusion_{split}_{name}_threshold.png")
    if cfg.gradcam_images:
        fig = gradcam_examples(model, data, idx, probs, threshold, spec, max(1, cfg.gradcam_images // 2), cfg.seed,
                               device)
        tracking.log_figure(fig, f"gradcam/gradcam_{split}.png")


def relog_missing_epochs(history: list[dict[str, float]]) -> None:
    """Epoch metrics a killed run checkpointed but did not get to log (it died in between)."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, "val_auc")}
    for metrics in history:
        if metrics["epoch"] not in logged:
            tracking.epoch_logger(int(metrics["epoch"]), metrics)


SCOPE_FIT_PHOTOS = 5000  # training photos the scope model is fitted on, at most


def fit_scope_model(model: torch.nn.Module, spec: PreprocessSpec, data: PreparedData, run_data: TrainingData,
                    device: torch.device, seed: int, negatives: np.ndarray | None = None) -> ScopeModel | None:
    """The in-scope check of one network (an ensemble has none), fitted on the stage statistics
    of (at most ``SCOPE_FIT_PHOTOS``) training photos; with ``negatives`` (model inputs of
    pictures known to be out of scope) it also learns a boundary against them and generated
    pictures; a colour model's check gets a colour limit. Its threshold is set on the validation
    photos' scores from the engine that will serve it (``report_model``)."""
    if isinstance(model, torch.nn.ModuleList):
        return None
    chosen = np.sort(np.random.default_rng(seed).permutation(run_data.fit_idx)[:SCOPE_FIT_PHOTOS])
    inside = scope_features(model, np.asarray(data.images[chosen]), spec, device)
    scope = fit_scope(inside)
    if negatives is not None:
        mlflow.log_metric("scope_negatives_supplied", len(negatives))
        scope = learn_boundary(scope, inside, outside_features(model, spec, data, run_data, device, seed, negatives),
                               scope_features(model, np.asarray(data.images[run_data.val_idx]), spec, device))
    if spec.channels == 3:
        val = run_data.val_idx
        colour = [colourfulness(torch.from_numpy(np.asarray(data.images[val[i:i + 256]])))
                  for i in range(0, len(val), 256)]
        scope = scope.with_colour_limit(torch.cat(colour).numpy())
    return scope


def outside_features(model: torch.nn.Module, spec: PreprocessSpec, data: PreparedData, run_data: TrainingData,
                     device: torch.device, seed: int, negatives: np.ndarray) -> np.ndarray:
    """The stage statistics of the supplied out-of-scope pictures and of generated ones."""
    photos = [decode_for_model(read_file(data.locations[i], data.paths[i]), spec) for i in run_data.val_idx[:16]]
    # Another seed than the generated pictures the run reports as caught (log_scope_checks).
    made = [preprocess(p, spec) for kind in generated_pictures(np.random.default_rng(seed + 1), photos, 16).values()
            for p in kind]
    return scope_features(model, np.concatenate([negatives, np.stack(made)]), spec, device)


def log_scope_checks(engine, scope: ScopeModel, spec: PreprocessSpec, scores: dict[str, np.ndarray],
                     photos: list[np.ndarray], seed: int) -> None:
    """The share of each set's photos in scope (``scores``: the check's scores of each set), and
    of generated pictures caught, by kind."""
    metrics = {"scope_threshold": scope.threshold, "scope_in_scope_share_target": IN_SCOPE_SHARE,
               **({"scope_colour_limit": float(scope.colour_limit)} if scope.coloured else {})}
    for name, set_scores in scores.items():
        metrics[f"{names.SCOPE.format(name)}in_scope"] = float(np.mean(set_scores <= scope.threshold))
    pictures = generated_pictures(np.random.default_rng(seed), photos)
    for kind, images in pictures.items():
        inputs = np.stack([preprocess(image, spec) for image in images])
        caught = float(np.mean(engine.outputs(inputs)[1].numpy() > scope.threshold))
        metrics[f"{names.SCOPE.format('generated_' + kind.replace(' ', '_'))}caught"] = caught
    tracking.log_metrics(metrics)


@dataclass
class TrainingReport:
    """What a training run returns: its summary (printed by ``melanoma train``) and the
    calibrated predictions on validation and on a held-out source (cross-source validation's
    raw material)."""

    summary: dict
    val: Predictions
    holdout: Predictions | None = None


def run_training(cfg: TrainConfig, on_epoch_end: EpochCallback | None = None, resume: dict | None = None,
                 checkpoints: bool = True, rule: ThresholdRule | None = None) -> TrainingReport:
    """Train and log everything to the active MLflow run.

    ``on_epoch_end`` is called after MLflow has the epoch's metrics (the search uses it to prune).
    With ``checkpoints`` every epoch leaves a checkpoint (``melanoma.checkpoint``); ``resume``,
    one such checkpoint of this run, continues training after its epoch. The operating threshold
    finds ``cfg.target_sensitivity`` of the validation melanomas, or follows ``rule`` (the share
    that travels, which cross-source validation found: ``melanoma.workflows.crossval``).
    """
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device()
    spec = cfg.preprocess_spec()
    run_data = load_data(cfg, spec)
    data, fit_idx, val_idx, test_idx = run_data.data, run_data.fit_idx, run_data.val_idx, run_data.data.indices("test")
    # Read before training, so that a wrong folder stops the run before its epochs, not after.
    scope_negatives = decode_folder(cfg.scope_negatives, spec) if cfg.scope_negatives else None

    tracking.tag_experiment()
    mlflow.set_tags({"dataset": "synthetic-demo" if run_data.synthetic else "real",
                     "synthetic_data": str(run_data.synthetic).lower(), "model_family": cfg.model,
                     "device": device.type})
    tracking.log_params({**settings_params(cfg), "data_location": ",".join(str(p.resolve()) for p in run_data.locations),
                         **dataset_params(data, fit_idx, val_idx, test_idx)})
    if data.skipped:
        tracking.log_json({"skipped": data.skipped}, "data/skipped_files.json")

    torch.manual_seed(cfg.seed)  # the new head's (or a scratch model's) initial weights: one seed, one run
    model = build_model(cfg.model, cfg.channels, cfg.pretrained, cfg.drop_path)
    mlflow.log_param("parameters", sum(p.numel() for p in model.parameters()))
    mlflow.set_tag("pretrained_weights", str(has_pretrained_weights(cfg.model, cfg.pretrained)).lower())

    def report_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.epoch_logger(epoch, metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    saver = RunCheckpoints(cfg) if checkpoints else None
    if resume is not None:
        relog_missing_epochs(resume["history"])
    result = fit_data(model, run_data, spec, cfg, device, on_epoch_end=report_epoch, on_checkpoint=saver,
                      resume=resume)
    mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": len(result.history)})
    log_audit(cfg, data.digest, demo_dataset(cfg.demo_size, cfg.seed, cache_dir()))  # after the epochs: the objective is the first metric
    tracking.log_figure(history_figure(result.history), "training/history.png")
    report = report_model(model, cfg.model, run_data, cfg, device, rule or ThresholdRule.validation(cfg.target_sensitivity),
                          scope_negatives)
    if saver is not None:
        saver.remove_local()
    report.summary["best_val_auc"] = result.best_val_auc
    return report


def report_model(model: torch.nn.Module, model_name: str | list[str], run_data: TrainingData, cfg: TrainConfig,
                 device: torch.device, rule: ThresholdRule, scope_negatives: np.ndarray | None = None) -> TrainingReport:
    """A trained network (or an ensemble's ``nn.ModuleList``, one name per member) calibrated
    and given its operating threshold on validation by ``rule``, every set reported with
    intervals, figures, and logged as the run's model with its card; inside the active run.
    ``scope_negatives``: pictures the in-scope check learns a boundary against (``fit_scope_model``)."""
    spec = cfg.preprocess_spec()
    data, val_idx, test_idx = run_data.data, run_data.val_idx, run_data.data.indices("test")
    groups = data.groups  # a lesion's photos (and copies of one photo) are resampled together
    scope = fit_scope_model(model, spec, data, run_data, device, cfg.seed, scope_negatives)
    # The final figures come from the engine the logged model will be served with.
    engine, graph, difference = checked_engine(Scorer(model, spec, cfg.tta, scope),
                                               np.asarray(data.images[val_idx[:256]]), device)
    mlflow.set_tag("scoring_engine", engine.name)
    mlflow.log_metric("onnx_max_probability_difference", difference)
    scope_scores: dict[str, np.ndarray] = {}  # the check's scores of each set, from the pass that gives its logits

    def logits_of(name: str, idx: np.ndarray) -> torch.Tensor:
        logits, scores = engine.outputs(np.asarray(data.images[idx]))
        if scores is not None:
            scope_scores[name] = scores.numpy()
        return logits

    val_labels, val_logits = data.labels[val_idx], logits_of("val", val_idx)
    val_sources = data.sources[val_idx]
    if scope is not None:  # on the scores of the engine that serves the model (its precision, not the fitting's)
        scope.threshold = threshold_for_sources(scope_scores["val"], val_sources, IN_SCOPE_SHARE)
    calibration = fit_calibration(cfg.calibration, val_logits, val_labels)
    val_probs = calibration.probabilities(val_logits)
    point = operating_point(val_labels, val_probs, rule.validation_sensitivity)
    tracking.log_threshold(point.threshold, rule)
    mlflow.log_metric("temperature", calibration.temperature)
    tracking.log_metrics(classification_metrics(val_labels, val_probs), prefix="best_val_")
    sets = {"val": log_set("val", names.VALIDATION, val_labels, val_logits, calibration, point.threshold,
                           groups[val_idx], cfg.bootstrap, cfg.seed)}
    by_source = source_metrics(val_labels, val_probs, val_sources, point.threshold)
    for source, metrics in by_source.items():
        tracking.log_metrics(metrics, prefix=names.VALIDATION_SOURCE.format(source))
    holdout = None
    if len(run_data.holdout_idx):
        held = run_data.holdout_idx
        held_logits = logits_of(cfg.holdout_source, held)
        sets[f"holdout {cfg.holdout_source}"] = log_set(
            f"holdout_{cfg.holdout_source}", names.HOLDOUT.format(cfg.holdout_source), data.labels[held], held_logits,
            calibration, point.threshold, groups[held], cfg.bootstrap, cfg.seed)
        holdout = Predictions(data.labels[held], calibration.probabilities(held_logits), groups[held])

    report_split, report_idx, report_probs = "val", val_idx, val_probs
    if len(test_idx):
        test_labels, test_logits = data.labels[test_idx], logits_of("test", test_idx)
        report_split, report_idx, report_probs = "test", test_idx, calibration.probabilities(test_logits)
        tracking.log_metrics(classification_metrics(test_labels, report_probs), prefix="test_")
        sets["test"] = log_set("test", names.TEST, test_labels, test_logits, calibration, point.threshold,
                               groups[test_idx], cfg.bootstrap, cfg.seed)
    log_report_figures(model, data, report_idx, report_probs, report_split, point.threshold, cfg, spec, device)

    for name, folder in external_names(cfg.external_dirs).items():
        external, logits = score_folder(engine, folder, spec)
        sets[name] = log_set(name, names.EXTERNAL.format(name), external.labels, logits, calibration, point.threshold,
                             external.groups, cfg.bootstrap, cfg.seed)
    tracking.log_figure(sets_figure({**{f"val: {k}": v for k, v in by_source.items()}, **sets}),
                        "evaluation/operating_point_by_set.png")
    if scope is not None:
        each_source = {f"val_{s}": scope_scores["val"][val_sources == s] for s in np.unique(val_sources)}
        log_scope_checks(engine, scope, spec, {**scope_scores, **(each_source if len(each_source) > 1 else {})},
                         [decode_for_model(read_file(data.locations[i], data.paths[i]), spec)
                          for i in val_idx[:8]], cfg.seed)

    example_bytes = read_file(data.locations[report_idx[0]], data.paths[report_idx[0]])
    model_uri = tracking.log_classifier(model.cpu(), model_name, spec, point.threshold, rule, example_bytes,
                                        calibration, graph, {"tta": cfg.tta}, scope)
    mlflow.set_tag("model_uri", model_uri)
    card.log_card(mlflow.active_run().info.run_id)
    report = sets[report_split]
    summary = {"report_split": report_split, "threshold": point.threshold, "model_uri": model_uri,
               **{f"{report_split}_{k}": v for k, v in report.items()}}
    return TrainingReport(summary, Predictions(val_labels, val_probs, groups[val_idx]), holdout)
