"""Optuna search over training settings (learning rate and batch size by default), one MLflow
child run per trial.

    mlflow run . -e search -P n_trials=20 --env-manager local
    melanoma search --n_trials 20 --params lr,batch_size,backbone_lr_factor

The objective is the best validation AUC of a trial's training run (never the test split).
Each trial is a child run of the search run with the same params and per-epoch metrics as a
`main` run; pruned trials end KILLED with the tag ``pruned=true``. The study lives in
``storage`` (an Optuna URL, SQLite by default): run the same command again after an
interruption and the study resumes, finishing the remaining trials. The best trial's model is
registered and the alias moved to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from melanoma import tracking
from melanoma.config import DEFAULT_ALIAS, REGISTERED_MODEL, TrainConfig, config_from_args
from melanoma.pipeline import run_training

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
DEFAULT_SEARCH = "lr,batch_size"
OBJECTIVE = "val_auc"
PRUNERS = ("median", "none")


def search_params(text: str) -> list[str]:
    """The comma-separated names of the settings to search, checked against SEARCH_SPACE."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SEARCH_SPACE]
    if unknown or not names:
        raise ValueError(f"cannot search {unknown or text!r}: choose from {', '.join(SEARCH_SPACE)}")
    return names


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Median pruning after 3 complete trials, never before epoch 3: early epochs of a
    cosine schedule are noisy, and pruning on them throws away good slow starters."""
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3)  # steps are epochs from 1


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Trials left RUNNING by a crashed or killed process become FAIL (and their runs FAILED),
    so they are not counted and their places are tried again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    client = MlflowClient()
    for trial in stale:
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
        log.warning("trial %d was left running by an earlier process; marked failed", trial.number)
    return len(stale)


def make_objective(base: TrainConfig, parent_run_id: str, study_name: str, params: list[str]):
    def objective(trial: optuna.Trial) -> float:
        cfg = dataclasses.replace(base, **{name: SEARCH_SPACE[name](trial) for name in params})

        def report(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[OBJECTIVE], step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({OBJECTIVE} {metrics[OBJECTIVE]:.4f})")

        with mlflow.start_run(run_name=f"trial-{trial.number:03d}", parent_run_id=parent_run_id, nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.set_tags({"optuna_study": study_name, "optuna_trial": trial.number})
            try:
                summary = run_training(cfg, on_epoch_end=report, checkpoints=False)  # a killed trial reruns whole
            except optuna.TrialPruned:
                mlflow.set_tag("pruned", "true")
                mlflow.end_run(status="KILLED")
                raise
            mlflow.set_tag("pruned", "false")
        return summary["best_val_auc"]

    return objective


def log_study(study: optuna.Study) -> dict:
    """The search run's record: best trial, history and importance plots, trial counts."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    best = study.best_trial
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.log_metrics({f"best_{OBJECTIVE}": best.value, "best_trial": best.number,
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
    return {"best_trial": best.number, f"best_{OBJECTIVE}": best.value, **best.params, **counts}


def parent_run_for(study: optuna.Study) -> str | None:
    """The search run to continue: the one `mlflow run` made, else the study's previous one."""
    if "MLFLOW_RUN_ID" in os.environ:
        return None
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            MlflowClient().get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            return None
    return None


def run_search(base: TrainConfig, *, n_trials: int, storage_url: str, study_name: str | None = None,
               timeout: float = 0, registered_model: str = REGISTERED_MODEL,
               alias: str = DEFAULT_ALIAS, pruner: str = "median", params: str = DEFAULT_SEARCH) -> dict:
    """Run (or resume) the study until it has ``n_trials`` finished trials; register the best."""
    base.validate()
    searched = search_params(params)
    study_name = study_name or f"melanoma-{base.model}"
    storage = optuna.storages.get_storage(storage_url)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=base.seed),
                                pruner=make_pruner(pruner))
    fail_stale_trials(study, storage)
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(0, n_trials - finished)
    log.info("study %s: %d trials finished, %d to run", study_name, finished, remaining)

    with mlflow.start_run(run_id=parent_run_for(study), run_name=f"search-{study_name}") as parent:
        study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
        tracking.tag_experiment()
        mlflow.set_tags({"optuna_study": study_name, "search": "true", "n_trials_requested": n_trials,
                         "synthetic_data": str(base.data == "demo").lower()})
        tracking.log_new_params({"study_name": study_name, "storage": storage_url,
                                 "pruner": pruner, "objective": OBJECTIVE, "searched": ",".join(searched),
                                 **{f"base_{k}": v for k, v in base.to_params().items()}})
        if remaining:
            study.optimize(make_objective(base, parent.info.run_id, study_name, searched), n_trials=remaining,
                           timeout=timeout or None)
        summary = log_study(study)
        best_run = study.best_trial.user_attrs["mlflow_run_id"]
        version = tracking.register_run_model(best_run, registered_model, alias, tags={
            "metric": OBJECTIVE, "value": f"{study.best_value:.6f}", "study": study_name, "run": best_run})
        mlflow.set_tags({"registered_model": registered_model, "registered_version": version.version})
    return {**summary, "study_name": study_name, "best_run_id": best_run,
            "registered": f"models:/{registered_model}/{version.version}", "alias": alias}


def search_from_args(args: argparse.Namespace) -> dict:
    return run_search(config_from_args(args), n_trials=args.n_trials, storage_url=args.storage,
                      study_name=args.study_name, timeout=args.timeout,
                      registered_model=args.registered_model, alias=args.alias, pruner=args.pruner,
                      params=args.params)
