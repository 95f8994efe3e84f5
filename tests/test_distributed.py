"""Search workers' bookkeeping through Optuna's public API: a worker's trial beats while it
runs, a silent one is failed and queued again, and a trial no worker started is failed."""

import time

import optuna
from optuna.trial import TrialState

from melanoma.workflows.distributed import fail_orphaned_trials, heartbeats, make_storage, start_trial


def test_a_beating_trial_stays_and_a_silent_one_is_failed_and_retried(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_seconds=1)
    study = optuna.create_study(study_name="beats", storage=storage)
    trial = start_trial(study, storage)
    trial.suggest_float("lr", 1e-4, 1e-2)
    with heartbeats(storage, study, trial.number):
        time.sleep(4.5)  # past the grace period (3 heartbeats): only the beating keeps it alive
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state == TrialState.RUNNING
    time.sleep(5.5)  # silent now, as after a SIGKILL: well past the 3 s grace period on busy cores
    optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed, and queued again with its parameters
    assert study.trials[1].params == trial.params


def test_a_trial_no_worker_started_is_failed(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_seconds=60)
    study = optuna.create_study(study_name="orphans", storage=storage)
    study.ask()  # a bare ask-and-tell process: no mark, no heartbeats
    mine = start_trial(study, storage)
    assert fail_orphaned_trials(study, storage) == 1
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING]
    assert study.trials[1].number == mine.number


def test_a_trial_that_fails_with_a_bug_fails_the_search_unless_asked_to_go_on(tmp_path):
    import pytest

    from melanoma.workflows.search import run_trial

    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_seconds=60)
    study = optuna.create_study(study_name="bugs", storage=storage)

    def objective(trial):
        raise TypeError("a bug in the objective")

    with pytest.raises(TypeError, match="a bug"):
        run_trial(study, storage, start_trial(study, storage), objective)
    run_trial(study, storage, start_trial(study, storage), objective, continue_on_error=True)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
