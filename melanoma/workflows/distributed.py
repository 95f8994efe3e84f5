"""Several search workers on one Optuna study: shared storage, heartbeats, a study-wide lock.

Optuna's public API only (storages' ``record_heartbeat`` and trial-id lookups, trial user
attributes): its heartbeat thread and tables are private and may change in any release.

Workers on one machine share SQLite; workers on several machines share PostgreSQL (or any
database SQLAlchemy reaches). Each running trial records a heartbeat; a trial whose worker died
(SIGKILL, a lost machine) stops beating, is marked FAIL after the grace period by whichever
worker looks next, and is queued again with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``); its MLflow run ends FAILED. Deciding whether to start
another trial, and starting it, happens under ``study_lock``, so N workers finish exactly the
requested number of trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # a trial whose worker dies is run again at most this often
CLAIMED = "claimed"  # user attribute of every trial a worker started (under the study lock)


class StaleTrialCallback(RetryHeartbeatStaleTrialCallback):
    """Queue a dead worker's trial again, and end its MLflow run FAILED (it would say RUNNING forever)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        end_trial_run(trial, "its worker stopped sending heartbeats")
        super().__call__(study, trial)


def end_trial_run(trial: FrozenTrial, why: str) -> None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    log.warning("trial %d failed: %s", trial.number, why)


def make_storage(url: str, heartbeat_seconds: int) -> RDBStorage:
    """The study's storage: heartbeats on, dead workers' trials retried, pooled connections
    checked before use (a connection idle for hours may have been closed by the server)."""
    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_seconds,
                      grace_period=3 * heartbeat_seconds,
                      heartbeat_stale_trial_callback=StaleTrialCallback(max_retry=MAX_RETRIES))


@contextlib.contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """One worker at a time, across processes and machines: a PostgreSQL advisory lock, or a
    file lock beside a SQLite database. Both are released if the holder dies."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///") + ".lock")
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if not url.startswith("postgresql"):
        log.warning("no study lock for %s storage: run one worker at a time (parallel workers need "
                    "SQLite or PostgreSQL)", url.split(":")[0])
        yield
        return
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def trial_id(storage: RDBStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of the study's trial ``number`` (what heartbeats are recorded under)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def start_trial(study: optuna.Study, storage: RDBStorage) -> optuna.Trial:
    """A new trial, marked as a worker's and beating at once. Call under ``study_lock``."""
    trial = study.ask()
    trial.set_user_attr(CLAIMED, True)
    storage.record_heartbeat(trial_id(storage, study, trial.number))
    return trial


@contextlib.contextmanager
def heartbeats(storage: RDBStorage, study: optuna.Study, number: int) -> Iterator[None]:
    """Record the trial's heartbeat every heartbeat interval for the duration of the block (as
    ``study.optimize`` does; ask-and-tell has none)."""
    stop, key = threading.Event(), trial_id(storage, study, number)

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            storage.record_heartbeat(key)

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_orphaned_trials(study: optuna.Study, storage: RDBStorage) -> int:
    """RUNNING trials no worker started (left by a process without heartbeats, e.g. a bare
    ``study.ask()``, which Optuna's stale-trial check skips) become FAIL. Call under
    ``study_lock``: a worker's trial is marked and beating from the moment it is created there."""
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if CLAIMED not in t.user_attrs]
    for trial in orphans:
        storage.set_trial_state_values(trial_id(storage, study, trial.number), TrialState.FAIL)
        end_trial_run(trial, "left running without heartbeats by an earlier process")
    return len(orphans)
