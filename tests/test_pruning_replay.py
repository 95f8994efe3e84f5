import optuna
import pytest

from experiments.pruning_replay import replay
from melanoma.workflows.search import make_pruner


def study_with_curves(curves: list[list[float]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for curve in curves:
        study.add_trial(optuna.trial.create_trial(
            value=max(curve), params={}, distributions={},
            intermediate_values={epoch: v for epoch, v in enumerate(curve, start=1)}))
    return study


def test_replay_counts_the_epochs_a_median_pruner_saves():
    good = [0.80, 0.85, 0.88, 0.90, 0.91, 0.92]
    bad = [0.60, 0.62, 0.63, 0.64, 0.65, 0.66]
    study = study_with_curves([good, good, good, bad, bad, [0.81, 0.86, 0.89, 0.91, 0.93, 0.95]])
    result = replay(study, make_pruner("median"))
    # Three startup trials run fully; the two bad ones stop at epoch 3, the first step after warm-up.
    assert result["pruned"] == 2
    assert result["epochs_unpruned"] == 36
    assert result["epochs_pruned"] == 36 - 2 * 3
    assert result["best_trial_survives"] and result["best_val_auc_with_pruning"] == pytest.approx(0.95)


def test_replay_without_a_pruner_saves_nothing():
    result = replay(study_with_curves([[0.5, 0.6], [0.4, 0.45]]), make_pruner("none"))
    assert result["epochs_saved"] == 0 and result["pruned"] == 0


def test_replay_needs_complete_trials():
    with pytest.raises(ValueError, match="no complete trials"):
        replay(optuna.create_study(), make_pruner("median"))
