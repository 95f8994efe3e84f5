"""Ensembles: finished training runs averaged into one model, logged and served like any other.

    melanoma ensemble --runs RUN_A,RUN_B[,RUN_C] [--alias champion]
    mlflow run . -e ensemble -P runs=RUN_A,RUN_B --env-manager local

The members' logits are averaged inside one ``Scorer`` (after each member's test-time views),
exported as one ONNX graph and served by the same pyfunc as a single network. The members must
have been validated on the same images: the same data, validation split and held-out source,
and the same preprocessing. Backbones may differ, and so may seeds when the split is fixed
(``split_seed``). The ensemble's calibration and threshold are fitted again on that validation
split with the members' threshold rule (``ThresholdRule``): the share of the validation
melanomas they were set to find (their mean, where they differ), so an ensemble of models with a
travelling threshold has one too.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import mlflow
import numpy as np
import torch

from melanoma import tracking
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.errors import SettingsError
from melanoma.classifier.inference import select_device
from melanoma.classifier.logged import LoggedModel, load_logged_model
from melanoma.config import EnsembleSettings, TrainConfig, parse_params, settings_params
from melanoma.data.training_data import load_data
from melanoma.reporting import dataset_params
from melanoma.workflows.training import TrainingReport, report_model

log = logging.getLogger(__name__)

# What members must share for their validation images to be the same (params of their runs).
SPLIT_PARAMS = ("data_location", "data_digest", "label_map", "holdout_source", "val_fraction")


@dataclass
class Member:
    """One finished training run: its settings and its logged model."""

    run_id: str
    params: dict[str, str]
    cfg: TrainConfig
    model: LoggedModel


def load_member(run_id: str) -> Member:
    """A finished training run as an ensemble member; a clear error for anything else."""
    run = mlflow.MlflowClient().get_run(run_id)  # MlflowException naming the run if there is none
    if "model_uri" not in run.data.tags or "data_location" not in run.data.params:
        raise SettingsError(f"run {run_id} is not a finished training run (it has no logged model): "
                            "an ensemble's members are `melanoma train` runs")
    return Member(run_id, run.data.params, parse_params(run.data.params), load_logged_model(run.data.tags["model_uri"]))


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
        if first.model.spec != member.model.spec:
            differ.append(f"preprocessing {first.model.spec} vs {member.model.spec}")
        if differ:
            raise SettingsError(f"runs {first.run_id} and {member.run_id} cannot form an ensemble: their validation "
                                f"images or inputs differ ({'; '.join(differ)})")


def ensemble_tta(members: list[Member], requested: str) -> str:
    """The ensemble's test-time views: the requested ones, else the members' own (which must agree)."""
    if requested:
        return requested
    views = {m.model.tta for m in members}
    if len(views) > 1:
        raise SettingsError(f"the members use different test-time views {sorted(views)}: choose one with --tta")
    return views.pop()


def ensemble_rule(members: list[Member]) -> ThresholdRule:
    """The members' threshold rule: the crossval rule (at the mean of their shares) where any of
    them travels, else the validation rule at their target."""
    rules = [m.model.rule for m in members]
    if len({r.name for r in rules}) > 1:
        log.warning("the members' thresholds were chosen by different rules %s: the ensemble's travels",
                    sorted({r.name for r in rules}))
    target = float(np.mean([r.target_sensitivity for r in rules]))
    if any(r.name == "crossval" for r in rules):
        return ThresholdRule("crossval", target, float(np.mean([r.validation_sensitivity for r in rules])))
    return ThresholdRule.validation(target)


def common_params(members: list[Member], own: set[str]) -> dict[str, str]:
    """The members' params, less the ensemble's ``own`` settings: one value where they agree, the
    members' values joined by commas where they differ (seed "1,2,3", say), so the run compares in
    the UI."""
    keys = [k for k in members[0].params if all(k in m.params for m in members) and k not in own]
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
    networks = [net for m in members for net in m.model.members]
    names = [name for m in members for name in m.model.names]
    device = select_device()
    model = torch.nn.ModuleList(networks).to(device).float().eval()
    run_data = load_data(cfg, first.model.spec)

    tracking.tag_experiment()
    mlflow.set_tags({"ensemble": "true", "ensemble_runs": ",".join(settings.run_ids), "model_family": "+".join(names),
                     "synthetic_data": str(run_data.synthetic).lower(), "device": device.type})
    own = settings_params(settings)
    # The settings as given (tta '' = the members' own), and what they resolved to beside them.
    params = {**common_params(members, set(own)), **own, "model": "+".join(names), "resolved_tta": tta,
              "resolved_external": cfg.external, "parameters": str(sum(p.numel() for p in model.parameters())),
              **dataset_params(run_data.data, run_data.fit_idx, run_data.val_idx, run_data.data.indices("test"))}
    tracking.log_params(params)
    report: TrainingReport = report_model(model, names, run_data, cfg, device, ensemble_rule(members))
    if settings.alias:
        version = tracking.register_run_model(mlflow.active_run().info.run_id, settings.registered_model,
                                              settings.alias)
        report.summary["registered"] = f"models:/{settings.registered_model}/{version.version}"
    return {"members": settings.run_ids, "model": "+".join(names), "tta": tta, **report.summary}
