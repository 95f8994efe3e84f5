"""Ensembles: finished training runs averaged into one model, logged and served like any other.

    melanoma ensemble --runs RUN_A,RUN_B[,RUN_C] [--alias champion]
    mlflow run . -e ensemble -P runs=RUN_A,RUN_B --env-manager local

The members' logits are averaged inside one ``Scorer`` (after each member's test-time views),
exported as one ONNX graph and served by the same pyfunc as a single network. The members must
have been validated on the same images: the same data, validation split and held-out source,
and the same preprocessing. Backbones may differ, and so may seeds when the split is fixed
(``split_seed``). The ensemble's calibration and threshold are fitted again on that validation
split with the members' threshold rule: the share of the validation melanomas they were set to
find (their mean, where they differ), so an ensemble of models with a travelling threshold has
one too.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import mlflow
import numpy as np
import torch

from melanoma import tracking
from melanoma.config import EnsembleSettings, TrainConfig, config_from_params
from melanoma.data.training_data import load_data
from melanoma.errors import SettingsError
from melanoma.inference import select_device
from melanoma.pipeline import TrainingReport, report_model
from melanoma.reporting import dataset_params
from melanoma.serving import MelanomaClassifier, network_names

log = logging.getLogger(__name__)

# What members must share for their validation images to be the same (params of their runs).
SPLIT_PARAMS = ("data_location", "data_digest", "label_map", "holdout_source", "val_fraction")


@dataclass
class Member:
    """One finished training run: its settings, its logged model and its threshold rule."""

    run_id: str
    params: dict[str, str]
    cfg: TrainConfig
    classifier: MelanomaClassifier
    validation_sensitivity: float  # the share of validation melanomas its threshold finds
    threshold_rule: str


def load_member(run_id: str) -> Member:
    """A finished training run as an ensemble member; a clear error for anything else."""
    run = mlflow.MlflowClient().get_run(run_id)  # MlflowException naming the run if there is none
    if "model_uri" not in run.data.tags or "data_location" not in run.data.params:
        raise SettingsError(f"run {run_id} is not a finished training run (it has no logged model): "
                            "an ensemble's members are `melanoma train` runs")
    classifier = mlflow.pyfunc.load_model(run.data.tags["model_uri"]).unwrap_python_model()
    metrics = run.data.metrics
    return Member(run_id, run.data.params, config_from_params(run.data.params), classifier,
                  metrics.get("threshold_validation_sensitivity", float(run.data.params["target_sensitivity"])),
                  run.data.tags.get("threshold_rule", "validation"))


def check_members(members: list[Member]) -> None:
    """The members were validated on the same images and take the same input, or an error
    naming what differs."""
    first = members[0]
    for member in members[1:]:
        differ = [f"{name} {first.params.get(name)!r} vs {member.params.get(name)!r}" for name in SPLIT_PARAMS
                  if first.params.get(name) != member.params.get(name)]
        if first.cfg.validation_seed != member.cfg.validation_seed:
            differ.append(f"validation split seed {first.cfg.validation_seed} vs {member.cfg.validation_seed} "
                          "(train seed ensembles with one --split_seed)")
        if first.classifier.spec != member.classifier.spec:
            differ.append(f"preprocessing {first.classifier.spec} vs {member.classifier.spec}")
        if differ:
            raise SettingsError(f"runs {first.run_id} and {member.run_id} cannot form an ensemble: their validation "
                                f"images or inputs differ ({'; '.join(differ)})")


def ensemble_tta(members: list[Member], requested: str) -> str:
    """The ensemble's test-time views: the requested ones, else the members' own (which must agree)."""
    if requested:
        return requested
    views = {m.classifier.settings.get("tta", "none") for m in members}
    if len(views) > 1:
        raise SettingsError(f"the members use different test-time views {sorted(views)}: choose one with --tta")
    return views.pop()


def common_params(members: list[Member]) -> dict[str, str]:
    """The members' params: one value where they agree, the members' values joined by commas
    where they differ (seed "1,2,3", say), so the run compares in the UI."""
    keys = [k for k in members[0].params if all(k in m.params for m in members)]
    return {k: members[0].params[k] if len({m.params[k] for m in members}) == 1
            else ",".join(m.params[k] for m in members) for k in keys}


def run_ensemble(settings: EnsembleSettings) -> dict:
    """Average ``settings.runs`` into one model inside the active MLflow run, calibrate it and
    choose its threshold on the members' shared validation split, report every set, log it
    (and register it with ``settings.alias``); returns the summary."""
    settings.validate()
    members = [load_member(run_id) for run_id in settings.run_ids]
    check_members(members)
    tta = ensemble_tta(members, settings.tta)
    first = members[0]
    cfg = dataclasses.replace(first.cfg, tta=tta, bootstrap=settings.bootstrap,
                              external=settings.external or first.cfg.external)
    networks = [net for m in members for net in m.classifier.members]
    names = [name for m in members for name in network_names(m.classifier.settings)]
    device = select_device()
    model = torch.nn.ModuleList(networks).to(device).float().eval()
    run_data = load_data(cfg, first.classifier.spec)

    tracking.tag_experiment()
    mlflow.set_tags({"ensemble": "true", "ensemble_runs": ",".join(settings.run_ids), "model_family": "+".join(names),
                     "synthetic_data": str(run_data.synthetic).lower(), "device": device.type})
    params = {**common_params(members), "model": "+".join(names), "tta": tta, "external": cfg.external,
              "bootstrap": str(settings.bootstrap), "parameters": str(sum(p.numel() for p in model.parameters())),
              **dataset_params(run_data.data, run_data.fit_idx, run_data.val_idx, run_data.data.indices("test"))}
    tracking.log_new_params(params)
    rules = {m.threshold_rule for m in members}
    share = float(np.mean([m.validation_sensitivity for m in members]))
    travelling = share if "crossval" in rules else None
    if len(rules) > 1:
        log.warning("the members' thresholds were chosen by different rules %s: the ensemble's travels", sorted(rules))
    report: TrainingReport = report_model(model, names, run_data, cfg, device, travelling)
    if settings.alias:
        version = tracking.register_run_model(mlflow.active_run().info.run_id, settings.registered_model,
                                              settings.alias)
        report.summary["registered"] = f"models:/{settings.registered_model}/{version.version}"
    return {"members": settings.run_ids, "model": "+".join(names), "tta": tta, **report.summary}
