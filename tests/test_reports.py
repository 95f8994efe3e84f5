"""What a reader of the results relies on: intervals that cover, calibration that calibrates,
the ISIC partial AUC, and the model card."""

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import norm

from melanoma.card import card_markdown, write_card
from melanoma.classifier.calibration import (
    Calibration,
    brier_score,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
)
from melanoma.cli import main
from melanoma.evaluate import partial_auc_above_sensitivity, specificity_at_sensitivity
from melanoma.intervals import bootstrap_intervals, weighted_auc


def test_auc_intervals_cover_the_true_auc_about_95_times_in_100():
    separation = 1.0
    true_auc = norm.cdf(separation / np.sqrt(2))  # two unit normals this far apart
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        labels = np.repeat([0, 1], 100)
        scores = rng.normal(separation * labels, 1.0)
        low, high = bootstrap_intervals(labels, scores, 0.5, resamples=400, seed=trial)["auc"]
        covered += low <= true_auc <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_group_resampling_widens_intervals_when_photos_of_a_lesion_repeat():
    rng = np.random.default_rng(1)
    lesion_labels = np.repeat([0, 1], 40)
    lesion_scores = rng.normal(lesion_labels, 1.0)
    labels, scores = np.repeat(lesion_labels, 5), np.repeat(lesion_scores, 5)  # 5 photos per lesion
    groups = np.repeat(np.arange(80), 5)
    naive = bootstrap_intervals(labels, scores, 0.5, resamples=500)["auc"]
    grouped = bootstrap_intervals(labels, scores, 0.5, groups=groups, resamples=500)["auc"]
    assert grouped[1] - grouped[0] > 1.8 * (naive[1] - naive[0])  # about sqrt(5) wider


def test_weighted_auc_is_scikit_learns_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    labels, scores = rng.integers(0, 2, 300), rng.integers(0, 10, 300) / 10
    weights = rng.integers(0, 3, (4, 300)).astype(float)
    np.testing.assert_allclose(weighted_auc(labels, scores, weights),
                               [roc_auc_score(labels, scores, sample_weight=w) for w in weights])


def test_single_class_sets_get_only_the_intervals_they_define():
    intervals = bootstrap_intervals(np.zeros(50, int), np.linspace(0, 1, 50), 0.5, resamples=100)
    assert set(intervals) == {"specificity"}
    low, high = intervals["specificity"]
    assert low < 0.5 < high


def overconfident_logits(n: int = 4000, scale: float = 4.0, seed: int = 0):
    """Labels drawn from true probabilities, and logits that exaggerate them ``scale`` times."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = torch.tensor(np.stack([np.zeros(n), scale * true_logit], 1), dtype=torch.float32)
    return logits, labels


def test_temperature_scaling_undoes_overconfidence():
    logits, labels = overconfident_logits()
    calibration = fit_temperature(logits, labels)
    assert calibration.temperature == pytest.approx(4.0, rel=0.15)
    raw, calibrated = Calibration().probabilities(logits), calibration.probabilities(logits)
    assert expected_calibration_error(labels, calibrated) < 0.03 < expected_calibration_error(labels, raw)
    assert brier_score(labels, calibrated) < brier_score(labels, raw)
    from sklearn.metrics import roc_auc_score  # a monotone map: the ranking, and so the AUC, stay

    assert roc_auc_score(labels, calibrated) == pytest.approx(roc_auc_score(labels, raw), abs=1e-3)


def test_isotonic_calibration_is_stored_as_knots_and_monotone():
    logits, labels = overconfident_logits(seed=1)
    calibration = fit_calibration("isotonic", logits, labels)
    again = Calibration(**calibration.to_dict())  # as the served model reads it back
    probs = again.probabilities(logits)
    order = np.argsort(Calibration().probabilities(logits))
    assert np.all(np.diff(probs[order]) >= 0)
    assert expected_calibration_error(labels, probs) < 0.03
    with pytest.raises(ValueError, match="calibration must be one of"):
        fit_calibration("platt", logits, labels)


def test_expected_calibration_error_on_a_known_case():
    labels = np.array([0, 0, 1, 1])
    assert expected_calibration_error(labels, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert expected_calibration_error(labels, np.full(4, 0.5)) == pytest.approx(0.0)  # one bin, 50 % observed
    assert expected_calibration_error(labels, np.array([0.9, 0.9, 0.1, 0.1])) == pytest.approx(0.9)


def test_partial_auc_matches_the_isic_challenge_scoring_package():
    from isic_challenge_scoring.metrics import auc_above_sensitivity
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    for _ in range(5):
        labels = rng.integers(0, 2, 400)
        probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 400), 0, 1)
        # The package integrates the ROC curve over the part above 80 % sensitivity; ISIC 2024 scores
        # the area between the curve and the 80 % line there, so the rectangle below it comes off.
        reference = auc_above_sensitivity(pd.Series(labels.astype(float)), pd.Series(probs),
                                          pd.Series(np.ones(len(labels))), 0.8)
        fpr, tpr, _ = roc_curve(labels, probs, drop_intermediate=False)
        rectangle = 0.8 * (1 - np.interp(0.8, tpr, fpr))
        assert partial_auc_above_sensitivity(labels, probs, 0.8) == pytest.approx(reference - rectangle, abs=1e-9)
    perfect = partial_auc_above_sensitivity(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert perfect == pytest.approx(0.2)


def test_specificity_at_sensitivity():
    labels = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.6, 0.7, 0.65, 0.9])
    assert specificity_at_sensitivity(labels, probs, 0.9) == 0.75  # both melanomas need t <= 0.65: 0.7 is called


def test_every_set_is_reported_with_intervals_calibration_and_a_card(trained_runs, demo_root, monkeypatch, capsys):
    trained_runs.activate(monkeypatch)
    client = MlflowClient()
    run = client.get_run(trained_runs.cnn)
    metrics = run.data.metrics
    for prefix in ("val_op_", "test_op_", "external_benign_"):
        assert f"{prefix}specificity_ci_low" in metrics and f"{prefix}ece" in metrics, prefix
        assert metrics[f"{prefix}specificity_ci_low"] <= metrics[f"{prefix}specificity"] <= metrics[
            f"{prefix}specificity_ci_high"]
    for key in ("test_op_auc_ci_high", "test_op_pauc_above_80_sensitivity", "test_op_average_precision",
                "test_op_specificity_at_95_sensitivity", "val_op_ece_uncalibrated", "temperature"):
        assert key in metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/reliability_val.png", "evaluation/reliability_benign.png", "evaluation/roc_test.png",
            "evaluation/operating_point_by_set.png"} <= artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    card = card_markdown(run, [])
    assert "not a medical device" in card and "## CLEAR Derm checklist" in card
    assert "On **external: benign** (4 images) it calls" in card
    assert "| test | 8 |" in card and "ECE before" in card
    assert main(["card", trained_runs.cnn]) == 0
    assert "# Model card" in capsys.readouterr().out
    assert {"model_card.md", "model_card.html"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_registering_and_evaluating_update_the_card(trained_runs, demo_root, monkeypatch):
    trained_runs.activate(monkeypatch)
    from melanoma.tracking import register_run_model

    version = register_run_model(trained_runs.second, "card-test", alias=None)
    client = MlflowClient()
    assert client.get_model_version("card-test", version.version).description.startswith("# Model card")
    assert main(["evaluate", "--model", f"models:/card-test/{version.version}", "--data",
                 str(demo_root / "test" / "malignant"), "--name", "clinic"]) == 0
    description = client.get_model_version("card-test", version.version).description
    assert "evaluated: clinic" in description and "finds" in description
    assert "evaluated: clinic" in write_card(f"models:/card-test/{version.version}")


def test_a_long_card_fits_a_registered_versions_description():
    from melanoma.card import MAX_DESCRIPTION, version_description

    card = "# Card\n\n" + "".join(f"## Section {i}\n\n" + "words " * 150 + "\n\n" for i in range(12))
    short = version_description(card, "abc123")
    assert len(card) > MAX_DESCRIPTION >= len(short)
    assert short.rstrip().endswith("The card continues in the artifact `model_card.md` of run `abc123`.*")
    assert "## Section 0" in short and "## Section 11" not in short  # cut at a section, not mid-sentence
    assert version_description("# A short card\n", "abc123") == "# A short card\n"
