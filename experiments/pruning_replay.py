"""What would pruning have saved? Replay a finished, unpruned study through a pruner.

    python -m experiments.pruning_replay --storage sqlite:///optuna.db --study_name melanoma-resnet18

Every trial of an unpruned study ran all its epochs, so its learning curve is known. Replaying
the trials in their original order through the same pruner the search uses (Optuna's own
code decides) gives, for exactly the same trials, the epochs a pruned search would have run
and whether it would still have found the best trial.
"""

from __future__ import annotations

import argparse
import json

import optuna
from optuna.trial import TrialState

from melanoma.workflows.search import make_pruner


def replay(study: optuna.Study, pruner: optuna.pruners.BasePruner) -> dict:
    """Epochs run without and with ``pruner`` over the complete trials of ``study``."""
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    if not trials:
        raise ValueError(f"study {study.study_name!r} has no complete trials to replay")
    shadow = optuna.create_study(direction=study.direction, pruner=pruner)
    epochs_unpruned = epochs_pruned = 0
    survivors = []
    for trial in trials:
        curve = sorted(trial.intermediate_values.items())
        epochs_unpruned += len(curve)
        live = shadow.ask()
        for step, value in curve:
            live.report(value, step)
            epochs_pruned += 1
            if live.should_prune():
                shadow.tell(live, state=TrialState.PRUNED)
                break
        else:
            shadow.tell(live, max(v for _, v in curve))
            survivors.append(trial)
    best = max(trials, key=lambda t: t.value)
    best_kept = max(survivors, key=lambda t: t.value)
    return {"trials": len(trials), "pruned": len(trials) - len(survivors),
            "epochs_unpruned": epochs_unpruned, "epochs_pruned": epochs_pruned,
            "epochs_saved": epochs_unpruned - epochs_pruned,
            "epochs_saved_share": 1 - epochs_pruned / epochs_unpruned,
            "best_val_auc": best.value, "best_val_auc_with_pruning": best_kept.value,
            "best_trial_survives": best_kept.number == best.number}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study_name", required=True)
    parser.add_argument("--pruner", default="median")
    args = parser.parse_args(argv)
    study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    print(json.dumps(replay(study, make_pruner(args.pruner)), indent=2))


if __name__ == "__main__":
    main()
