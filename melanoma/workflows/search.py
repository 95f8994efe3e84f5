"""Optuna search over training settings (learning rate and batch size by default), one MLflow
child run per trial.

    mlflow run . -e search -P n_trials=20 --env-manager local
    melanoma search --n_trials 20 --params lr,batch_size,backbone_lr_factor

The objective is the best validation AUC of a trial's training run (never the test split), or
with ``objective=crossval_worst_auc`` (``crossval_mean_auc``) the worst (mean) AUC on held-out
sources of a cross-source validation per trial (``melanoma.workflows.crossval``; K+1 trainings a trial).
Each trial is a child run of the search run with the same params and per-epoch metrics as a
`main` run (a crossval trial's held-out runs are its children); pruned trials end KILLED with
the tag ``pruned=true``. The study lives in
``storage`` (an Optuna URL, SQLite by default): run the same command again after an
interruption and the study resumes, finishing the remaining trials. The best trial's model is
registered and the alias moved to it.

Several workers (the same command started N times, on one machine with SQLite or on several
with PostgreSQL) share one study: together they finish exactly ``n_trials`` trials, each trial a
child run of its own worker's search run, and whichever worker sees the study done registers
the best model, once (``melanoma.workflows.distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from melanoma import tracking
from melanoma.classifier.errors import SettingsError
from melanoma.config import SearchSettings, TrainConfig, config_from_args, settings_params
from melanoma.workflows.distributed import fail_orphaned_trials, heartbeats, make_storage, start_trial, study_lock
from melanoma.workflows.training import run_training

log = logging.getLogger(__name__)

# What each searchable setting may take. lr: below 1e-4 ten epochs are not enough to converge;
# above 3e-3 BatchNorm networks at batch 16 diverge on this data. batch_size: the notebook's 16
# up to 64; CPU throughput no longer improves past 64.
SEARCH_SPACE: dict[str, Callable[[optuna.Trial], float]] = {
    "lr": lambda t: t.suggest_float("lr", 1e-4, 3e-3, log=True),
    "batch_size": lambda t: t.suggest_categorical("batch_size", (16, 32, 64)),
    "backbone_lr_factor": lambda t: t.suggest_float("backbone_lr_factor", 0.03, 1.0, log=True),
    "weight_decay": lambda t: t.suggest_float("weight_decay", 1e-4, 0.1, log=True),
    "label_smoothing": lambda t: t.suggest_float("label_smoothing", 0.0, 0.2),
    "wise_alpha": lambda t: t.suggest_float("wise_alpha", 0.3, 1.0),
    "ema": lambda t: t.suggest_categorical("ema", (0.0, 0.99, 0.999)),
    "freeze_epochs": lambda t: t.suggest_int("freeze_epochs", 0, 2),
}


def search_params(text: str) -> list[str]:
    """The comma-separated names of the settings to search, checked against SEARCH_SPACE."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SEARCH_SPACE]
    if unknown or not names:
        raise SettingsError(f"cannot search {unknown or text!r}: choose from {', '.join(SEARCH_SPACE)}")
    return names


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Median pruning after 3 complete trials, never before epoch 3: early epochs of a
    cosine schedule are noisy, and pruning on them throws away good slow starters."""
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3)  # steps are epochs from 1


class NoCompleteTrialError(SettingsError):
    """Every trial of the study was pruned or failed: there is no best model."""


# The search's settings that belong to one invocation rather than to the study.
INVOCATION_SETTINGS = ("storage", "n_trials", "timeout", "heartbeat", "continue_on_trial_error")


def make_objective(base: TrainConfig, parent_run_id: str, study_name: str, params: list[str], objective_name: str):
    def objective(trial: optuna.Trial) -> float:
        cfg = dataclasses.replace(base, **{name: SEARCH_SPACE[name](trial) for name in params})

        def report(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["val_auc"], step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_auc {metrics['val_auc']:.4f})")

        with mlflow.start_run(run_name=f"trial-{trial.number:03d}", parent_run_id=parent_run_id, nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.set_tags({"optuna_study": study_name, "optuna_trial": trial.number})
            if objective_name.startswith("crossval_"):  # no epochs to prune on: K trainings, then the final one
                from melanoma.workflows.crossval import run_crossval

                return run_crossval(cfg)[objective_name]
            try:
                summary = run_training(cfg, on_epoch_end=report, checkpoints=False).summary  # a killed trial reruns whole
            except optuna.TrialPruned:
                mlflow.set_tag("pruned", "true")
                mlflow.end_run(status="KILLED")
                raise
            mlflow.set_tag("pruned", "false")
        return summary["best_val_auc"]

    return objective


def log_study(study: optuna.Study, objective: str) -> dict:
    """The search run's record: best trial, history and importance plots, trial counts."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    by_state = trial_counts(study)
    counts = {state.name.lower(): by_state[state] for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    best = study.best_trial
    # Metrics, not params: a resumed search's best may change, and a param cannot.
    mlflow.log_metrics({**{f"best_{k}": v for k, v in best.params.items()}, f"best_{objective}": best.value,
                        "best_trial": best.number,
                        "epochs_total": sum(len(t.intermediate_values) for t in study.trials)})
    plots = [("search/optimization_history.png", optuna_plots.plot_optimization_history)]
    if counts["complete"] >= 2:
        plots.append(("search/param_importances.png", optuna_plots.plot_param_importances))
    for artifact, plot in plots:
        ax = plot(study)
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        mlflow.log_figure(fig, artifact)
        plt.close(fig)
    return {"best_trial": best.number, f"best_{objective}": best.value, **best.params, **counts}


def parent_run_for(study: optuna.Study) -> str | None:
    """The search run to continue: the one `mlflow run` made, else the study's previous one
    unless it is still running (then it belongs to another worker, and this one starts its own)."""
    if "MLFLOW_RUN_ID" in os.environ:
        return None
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            return run_id if MlflowClient().get_run(run_id).info.status != "RUNNING" else None
        except mlflow.exceptions.MlflowException:
            return None
    return None


def safe_url(url: str) -> str:
    """A storage URL fit to log: any password masked."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def trial_counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def finished(counts: Counter) -> int:
    return counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]


def claim_trial(study: optuna.Study, storage: optuna.storages.RDBStorage, storage_url: str,
                n_trials: int) -> optuna.Trial | bool:
    """Under the study lock: a trial for this worker to run (a retried one first), False when the
    study has its ``n_trials``, True when the rest are running elsewhere (wait and ask again)."""
    with study_lock(storage_url, study.study_name):
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, and queued again
        fail_orphaned_trials(study, storage)
        counts = trial_counts(study)
        if finished(counts) >= n_trials:
            return False
        if finished(counts) + counts[TrialState.RUNNING] + counts[TrialState.WAITING] >= n_trials \
                and not counts[TrialState.WAITING]:
            return True
        return start_trial(study, storage)  # beating before the lock is released


def run_trial(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: optuna.Trial,
              objective: Callable[[optuna.Trial], float], continue_on_error: bool = False) -> None:
    """The objective with heartbeats, its outcome told to the study (as ``study.optimize`` does).
    A trial that raises is FAILED, and the error ends the search unless ``continue_on_error``."""
    with heartbeats(storage, study, trial.number):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            if not continue_on_error:
                raise
            log.exception("trial %d failed; the search goes on (continue_on_trial_error)", trial.number)
            return
    study.tell(trial, value)


def register_once(study: optuna.Study, storage_url: str, registered_model: str, alias: str, objective: str) -> str:
    """Register the best trial's model unless a worker already did at this number of finished
    trials; returns the version."""
    with study_lock(storage_url, study.study_name):
        done = finished(trial_counts(study))
        previous = study.user_attrs.get("registered", {})
        if previous.get("finished") == done:
            return previous["version"]
        best_run = study.best_trial.user_attrs["mlflow_run_id"]
        version = tracking.register_run_model(best_run, registered_model, alias, tags={
            "metric": objective, "value": f"{study.best_value:.6f}", "study": study.study_name, "run": best_run})
        study.set_user_attr("registered", {"finished": done, "version": version.version})
        return version.version


def run_search(base: TrainConfig, settings: SearchSettings = SearchSettings()) -> dict:
    """Work on (or resume) the study until it has ``settings.n_trials`` finished trials, with any
    number of other workers; register the best once."""
    base.validate()
    settings.validate()
    searched = search_params(settings.params)
    study_name = settings.study_name or f"melanoma-{base.model}"
    storage_url, n_trials, heartbeat = settings.storage, settings.n_trials, settings.heartbeat
    with study_lock(storage_url, study_name):  # the first worker creates Optuna's tables and the study
        storage = make_storage(storage_url, heartbeat)
        study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
        worker = study.user_attrs.get("workers_started", 0)
        study.set_user_attr("workers_started", worker + 1)
    # Each worker samples from its own seed (the same one would repeat the others' first trials);
    # constant_liar keeps TPE from proposing what another worker is running.
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(settings.pruner),
                              sampler=optuna.samplers.TPESampler(seed=base.seed + worker, constant_liar=True))
    log.info("study %s: %d of %d trials finished", study_name, finished(trial_counts(study)), n_trials)

    # The settings as `mlflow run` logs them, less those of this invocation alone (a resumed search
    # may ask for more trials): tags, which can change; the storage URL's password masked.
    invocation = {**settings_params(settings), "storage": safe_url(storage_url)}
    invocation_tags = {f"search_{k}": invocation.pop(k) for k in INVOCATION_SETTINGS}
    params = {**settings_params(base), **invocation}
    resumed = parent_run_for(study)
    if resumed:
        try:
            tracking.check_params(resumed, params)
        except tracking.ParamConflictError as exc:
            raise SettingsError(f"study {study_name!r} was searched with other settings ({exc.conflicts}): search "
                                "with the same settings, or give another --study_name") from None
    with mlflow.start_run(run_id=resumed, run_name=f"search-{study_name}") as parent:
        study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
        tracking.tag_experiment()
        mlflow.set_tags({"optuna_study": study_name, "search": "true", "n_trials_requested": n_trials,
                         "synthetic_data": str(base.data == "demo").lower(), **invocation_tags})
        tracking.log_params(params)
        objective = make_objective(base, parent.info.run_id, study_name, searched, settings.objective)
        deadline = time.monotonic() + settings.timeout if settings.timeout else math.inf
        while time.monotonic() < deadline:
            trial = claim_trial(study, storage, storage_url, n_trials)
            if trial is False:
                break
            if trial is True:
                time.sleep(min(heartbeat, 5))  # the others' trials: wait for them to end (or go stale)
                continue
            run_trial(study, storage, trial, objective, settings.continue_on_trial_error)
        if not trial_counts(study)[TrialState.COMPLETE]:
            raise NoCompleteTrialError(f"study {study_name!r} has no complete trial ({dict(trial_counts(study))}): "
                                       "nothing to register; search more trials, or prune less")
        summary = log_study(study, settings.objective)
        version = register_once(study, storage_url, settings.registered_model, settings.alias, settings.objective)
        mlflow.set_tags({"registered_model": settings.registered_model, "registered_version": version})
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    return {**summary, "study_name": study_name, "best_run_id": best_run,
            "registered": f"models:/{settings.registered_model}/{version}", "alias": settings.alias}


def search_from_args(args: argparse.Namespace) -> dict:
    return run_search(config_from_args(args), config_from_args(args, SearchSettings))
