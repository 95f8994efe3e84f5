"""Do averaged models, or flip test-time augmentation, leave more external nevi alone?

Takes finished training runs (``melanoma train``), scores each one's validation split (carved
again from the run's own params) and the external folders with the run's logged model, then, for
every combination of the runs, with and without averaging over the four flips of each image,
chooses the threshold on validation for the target sensitivity and reports validation AUC and
accuracy and the specificity on each external folder. Nothing is trained or logged.

    python -m experiments.ensemble --external ../shared/data/ham_nevi_dev --out ensemble.json RUN_ID RUN_ID ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import mlflow
import numpy as np

from melanoma.classifier.engine import checked_engine
from melanoma.data.dataset import prepare_dataset
from melanoma.data.training_data import load_data
from melanoma.evaluate import classification_metrics, external_names, operating_point
from melanoma.workflows.ensemble import Member, check_members, load_member

log = logging.getLogger("melanoma.workflows.ensemble")

def probabilities(classifier, images: np.ndarray, flips: bool) -> np.ndarray:
    """Malignant probability per image through the model's own engine, or with its four flips
    averaged when ``flips``."""
    engine = classifier.engine
    if flips:
        engine, _, _ = checked_engine(classifier.scorer("flip"), np.asarray(images[:64]), classifier.device)
    return classifier.calibration.probabilities(engine.logits(np.asarray(images)))


def score_run(member: Member, external: list[str]) -> dict:
    """Validation labels, and probabilities (plain and flip-averaged) on validation and each external folder."""
    classifier = member.model
    data = load_data(member.cfg, classifier.spec)
    sets = {"val": data.data.images[data.val_idx]}
    for name, folder in external_names(external).items():
        sets[name] = prepare_dataset(folder, classifier.spec, require_train=False).images
    return {"name": mlflow.get_run(member.run_id).info.run_name, "val_labels": data.data.labels[data.val_idx],
            "probs": {flips: {k: probabilities(classifier, images, flips) for k, images in sets.items()}
                      for flips in (False, True)}}


def combination_row(runs: list[dict], flips: bool, target_sensitivity: float) -> dict:
    """The figures of the runs' averaged probabilities at the threshold chosen on validation."""
    averaged = {k: np.mean([r["probs"][flips][k] for r in runs], axis=0) for k in runs[0]["probs"][flips]}
    labels = runs[0]["val_labels"]
    point = operating_point(labels, averaged["val"], target_sensitivity)
    at_half = classification_metrics(labels, averaged["val"])
    row = {"runs": [r["name"] for r in runs], "flips": flips, "threshold": point.threshold,
           "val_auc": at_half["auc"], "val_accuracy": at_half["accuracy"],
           "val_op_specificity": point.metrics["specificity"]}
    for name, probs in averaged.items():
        if name != "val":
            row[f"external_{name}_specificity"] = float(np.mean(probs < point.threshold))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="MLflow run IDs of finished training runs, same data and split")
    parser.add_argument("--external", nargs="+", required=True, help="evaluation-only folders (benign nevi, say)")
    parser.add_argument("--target_sensitivity", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)

    members = [load_member(run_id) for run_id in args.runs]
    check_members(members)  # validated on the same images, or an error saying what differs
    scored = [score_run(member, args.external) for member in members]
    rows = [combination_row(list(combo), flips, args.target_sensitivity)
            for size in range(1, len(scored) + 1) for combo in itertools.combinations(scored, size)
            for flips in (False, True)]
    for row in rows:
        externals = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("external_"))
        print(f"{'+'.join(row['runs']):40s} flips={str(row['flips']):5s} val_auc={row['val_auc']:.3f} "
              f"val_accuracy={row['val_accuracy']:.3f} {externals}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
