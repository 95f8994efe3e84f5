"""One training run from settings to a logged model, inside the active MLflow run.

data -> split -> fit (per-epoch metrics) -> operating point on validation -> report on test
(or validation) -> external sets -> figures -> logged pyfunc model.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import mlflow
import numpy as np
import torch

from melanoma import tracking
from melanoma.audit import audit_dataset, audit_figure, public_report
from melanoma.config import TrainConfig
from melanoma.data.dataset import PreparedData
from melanoma.data.layout import CLASSES, read_file
from melanoma.data.preprocessing import PreprocessSpec
from melanoma.evaluate import classification_metrics, external_names, folder_metrics, operating_point, score_folder
from melanoma.figures import confusion_figure, gradcam_panel, history_figure, roc_figure
from melanoma.gradcam import GradCAM
from melanoma.inference import predict_proba, select_device, to_model_input
from melanoma.models import build_model, gradcam_layer
from melanoma.train import EpochCallback, fit_data, load_data

log = logging.getLogger(__name__)

AUDIT_METRICS = ("border_probe_auc", "exact_duplicate_pairs", "near_duplicate_pairs", "cross_split_duplicate_pairs",
                 "conflicting_label_pairs")


def dataset_params(data: PreparedData, fit_idx: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray) -> dict:
    params = {"data_digest": data.digest, "data_skipped_files": len(data.skipped)}
    for split, idx in (("train", fit_idx), ("val", val_idx), ("test", test_idx)):
        params[f"data_{split}_count"] = len(idx)
        for name, count in data.class_counts(idx).items():
            params[f"data_{split}_{name}"] = count
    return params


def gradcam_examples(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                     spec: PreprocessSpec, per_class: int, seed: int, device: torch.device):
    """Grad-CAM figure for ``per_class`` random images of each class."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in (0, 1)])
    x = to_model_input(torch.from_numpy(images[chosen]), spec, device)
    with GradCAM(model, gradcam_layer(model, spec.img_size, spec.channels)) as cam:
        maps = cam(x).cpu().numpy()
    return gradcam_panel(images[chosen], maps, labels[chosen], probs[chosen], CLASSES)


@functools.lru_cache(maxsize=4)
def cached_audit(location: str, seed: int, digest: str) -> dict:
    """One audit per dataset and process: a search's trials share it instead of repeating it."""
    return audit_dataset(location, seed=seed)


def log_audit(location: Path, seed: int, digest: str) -> None:
    """The data audit of every training run: metrics, verdict, JSON and figure."""
    report = cached_audit(str(location), seed, digest)
    tracking.log_metrics({k: report[k] for k in AUDIT_METRICS}, prefix="audit_")
    mlflow.set_tag("audit_verdict", report["verdict"])
    tracking.log_json(public_report(report), "audit/audit.json")
    tracking.log_figure(audit_figure(report), "audit/audit.png")


def log_report(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, probs: np.ndarray, split: str,
               threshold: float, cfg: TrainConfig, spec: PreprocessSpec, device: torch.device) -> dict[str, float]:
    """Final metrics at 0.5 and at the operating threshold, confusion matrices, ROC, Grad-CAM."""
    report = classification_metrics(labels, probs, 0.5)
    if split != "val":  # validation's are logged already, as best_val_* and val_op_*
        tracking.log_metrics(report, prefix=f"{split}_")
        tracking.log_metrics(classification_metrics(labels, probs, threshold), prefix=f"{split}_op_")
    for name, t in (("0.5", 0.5), ("operating", threshold)):
        tracking.log_figure(confusion_figure(labels, probs, t, f"{split} set, {name} threshold"),
                            f"evaluation/confusion_{split}_{name}_threshold.png")
    tracking.log_figure(roc_figure(labels, probs, threshold, f"ROC, {split} set"), f"evaluation/roc_{split}.png")
    if cfg.gradcam_images:
        fig = gradcam_examples(model, images, labels, probs, spec, max(1, cfg.gradcam_images // 2), cfg.seed, device)
        tracking.log_figure(fig, f"gradcam/gradcam_{split}.png")
    return report


def run_training(cfg: TrainConfig, on_epoch_end: EpochCallback | None = None) -> dict:
    """Train and log everything to the active MLflow run; returns the final report metrics.

    ``on_epoch_end`` is called after MLflow has the epoch's metrics (the search uses it to prune).
    """
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device()
    spec = cfg.preprocess_spec()
    run_data = load_data(cfg, spec)
    data, fit_idx, val_idx, test_idx = run_data.data, run_data.fit_idx, run_data.val_idx, run_data.data.indices("test")

    mlflow.set_tags({"dataset": "synthetic-demo" if run_data.synthetic else "real",
                     "synthetic_data": str(run_data.synthetic).lower(), "model_family": cfg.model,
                     "device": device.type})
    tracking.log_new_params({**cfg.to_params(), "data_location": str(run_data.location.resolve())})
    mlflow.log_params(dataset_params(data, fit_idx, val_idx, test_idx))
    mlflow.log_metric("data_skipped_files", len(data.skipped))
    if data.skipped:
        tracking.log_json({"skipped": data.skipped}, "data/skipped_files.json")
    log_audit(run_data.location, cfg.seed, data.digest)

    model = build_model(cfg.model, cfg.channels, cfg.pretrained, cfg.drop_path)
    mlflow.log_param("parameters", sum(p.numel() for p in model.parameters()))

    def report_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.epoch_logger(epoch, metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    result = fit_data(model, run_data, spec, cfg, device, on_epoch_end=report_epoch)
    mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": len(result.history)})
    tracking.log_figure(history_figure(result.history), "training/history.png")

    val_probs = predict_proba(model, data.images[val_idx], spec, device)
    point = operating_point(data.labels[val_idx], val_probs, cfg.target_sensitivity)
    mlflow.log_metric("threshold", point.threshold)
    tracking.log_metrics(classification_metrics(data.labels[val_idx], val_probs), prefix="best_val_")
    tracking.log_metrics(point.metrics, prefix="val_op_")

    report_split, report_idx = ("test", test_idx) if len(test_idx) else ("val", val_idx)
    report_probs = val_probs if report_split == "val" else predict_proba(model, data.images[report_idx], spec, device)
    report = log_report(model, data.images[report_idx], data.labels[report_idx], report_probs, report_split,
                        point.threshold, cfg, spec, device)

    for name, folder in external_names(cfg.external_dirs).items():
        external, probs = score_folder(model, folder, spec, device)
        tracking.log_metrics(folder_metrics(external.labels, probs, point.threshold), prefix=f"external_{name}_")

    example_bytes = read_file(run_data.location, data.paths[report_idx[0]])
    model_uri = tracking.log_classifier(model.cpu(), cfg.model, spec, point.threshold, example_bytes,
                                        {"target_sensitivity": cfg.target_sensitivity})
    mlflow.set_tag("model_uri", model_uri)
    return {"report_split": report_split, "threshold": point.threshold, "best_val_auc": result.best_val_auc,
            "model_uri": model_uri, **{f"{report_split}_{k}": v for k, v in report.items()}}
