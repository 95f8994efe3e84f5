"""Cross-source validation: copies attributed to their collection, one child per held-out source,
the parent's figures, the travelling threshold, and bad input."""

import logging
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from melanoma.classifier.logged import load_logged_model
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.classifier.scope import IN_SCOPE_SHARE
from melanoma.config import CrossvalSettings, TrainConfig
from melanoma.data.combine import load_datasets
from melanoma.data.demo import make_demo_dataset
from melanoma.data.records import DataError
from melanoma.data.training_data import load_data
from melanoma.evaluate import Predictions
from melanoma.workflows.crossval import needed_validation_sensitivity, rule_results, run_crossval, travel_sensitivity
from melanoma.workflows.training import TrainingReport

from .test_datasets import write_metadata_dataset

SPEC = PreprocessSpec(img_size=32, channels=3, color_constancy=False)


def plant_copies(pooled: Path, collection: Path, count: int) -> list[str]:
    """Copy ``count`` malignant photos of a Kaggle-layout ``collection`` into ``pooled``'s
    malignant class, resized and re-encoded, as the Kaggle melanoma set holds ISIC 2017's."""
    names = []
    for image in sorted((collection / "train" / "malignant").glob("*.jpg"))[:count]:
        copy = cv2.resize(cv2.imread(str(image)), (90, 90), interpolation=cv2.INTER_AREA)
        name = f"copy_{image.name}"
        cv2.imwrite(str(pooled / "train" / "malignant" / name), copy, [cv2.IMWRITE_JPEG_QUALITY, 85])
        names.append(name)
    return names


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Three small sources: a pooled Kaggle-layout set holding copies of another collection's
    melanomas, that collection (Kaggle layout, no lesions recorded), and a metadata source."""
    root = tmp_path_factory.mktemp("sources")
    collection = make_demo_dataset(root / "isic", per_class=10, seed=5, size=64)
    pooled = make_demo_dataset(root / "pooled", per_class=10, seed=3, size=64)
    plant_copies(pooled, collection, 4)
    ham = write_metadata_dataset(root / "ham", lesions=10, seed=2)
    return {"pooled": pooled, "isic": collection, "ham": ham}


def test_copies_count_as_the_collection_named_later(sources):
    pooled, isic = sources["pooled"], sources["isic"]
    data = load_datasets(f"{pooled},{isic}", SPEC)
    assert data.copies_removed == 4
    assert not any("copy_" in p for p in data.paths)  # the pooled set's copies went, the collection's stayed
    isic_malignant = int(np.sum((data.sources == "isic") & (data.labels == 1)))
    assert isic_malignant == 10 + 2  # its train and test melanomas, each counted once
    # Named the other way round, the pooled set would be taken for the collection: the order is the rule.
    assert any("copy_" in p for p in load_datasets(f"{isic},{pooled}", SPEC).paths)


def test_copies_across_four_datasets_count_once_as_the_collection_named_later(sources, tmp_path):
    pooled = make_demo_dataset(tmp_path / "pooled", per_class=10, seed=3, size=64)
    plant_copies(pooled, sources["isic"], 4)
    patients = write_metadata_dataset(tmp_path / "isic2020", lesions=10, seed=7, lesions_per_patient=2)
    for image in sorted((patients / "images").glob("ISIC_70010.jpg")) + sorted((patients / "images").glob("ISIC_70030.jpg")):
        copy = cv2.resize(cv2.imread(str(image)), (90, 90), interpolation=cv2.INTER_AREA)  # two of its melanomas
        cv2.imwrite(str(pooled / "train" / "malignant" / f"copy_{image.name}"), copy, [cv2.IMWRITE_JPEG_QUALITY, 85])
    data = load_datasets(f"{pooled},{sources['isic']},{sources['ham']},{patients}", SPEC)
    assert data.copies_removed == 6 and not any("copy_" in p for p in data.paths)
    counts = {s: int(np.sum(data.sources == s)) for s in ("pooled", "isic", "ham", "isic2020")}
    assert counts == {"pooled": 20 + 4, "isic": 24, "ham": 20, "isic2020": 20}  # every photo once, under its collection


def test_holding_out_a_collection_removes_its_copies_elsewhere(sources):
    cfg = TrainConfig(model="cnn", data=f"{sources['pooled']},{sources['isic']}", img_size=32,
                      holdout_source="isic", crop_lesion=True)
    run = load_data(cfg, cfg.preprocess_spec())
    trained_on = [run.data.paths[i] for i in np.concatenate([run.fit_idx, run.val_idx])]
    assert not any("copy_" in p for p in trained_on)
    assert set(run.data.sources[run.holdout_idx]) == {"isic"}


def shifted_scores(shift: float, n: int = 100) -> TrainingReport:
    """A child whose held-out melanomas score ``shift`` lower than its validation melanomas."""
    val_mel, benign = np.linspace(0.5, 1.0, n), np.linspace(0.0, 0.45, n)
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    val = Predictions(labels, np.r_[val_mel, benign], np.arange(2 * n))
    held = Predictions(labels, np.r_[val_mel - shift, benign], np.arange(2 * n))
    return TrainingReport({"threshold": 0.55}, val, held)


def test_the_travelling_threshold_recovers_a_known_shift():
    # Held-out melanomas 0.02 lower: finding 90 % of them takes finding 93 % of validation's.
    assert needed_validation_sensitivity(shifted_scores(0.02).val, shifted_scores(0.02).holdout, 0.9) == \
        pytest.approx(0.93, abs=0.011)
    children = {name: shifted_scores(0.02) for name in ("a", "b", "c")}
    assert travel_sensitivity(children, 0.9) == pytest.approx(0.93, abs=0.011)
    rules = rule_results(children, 0.9, resamples=100, seed=0)
    for source in children:
        assert rules[source]["validation"]["sensitivity"] < 0.88  # the in-source rule falls short there
        assert rules[source]["crossval"]["sensitivity"] >= 0.9 - 0.011  # the travelling one holds
        assert rules[source]["crossval"]["specificity"] == 1.0  # benign scores stay below both thresholds
    # Without a shift both rules agree.
    same = rule_results({n: shifted_scores(0.0) for n in "ab"}, 0.9, 0, 0)
    assert same["a"]["crossval"]["threshold"] == same["a"]["validation"]["threshold"]


def test_crossval_trains_a_child_per_source_and_a_final_model(sources):
    data = ",".join(str(p) for p in sources.values())
    cfg = TrainConfig(model="cnn", data=data, epochs=1, img_size=32, batch_size=16, gradcam_images=0, bootstrap=50)
    with mlflow.start_run() as parent:
        summary = run_crossval(cfg, CrossvalSettings())
    client = MlflowClient()
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    held = sorted(r.data.tags["crossval_heldout"] for r in children if "crossval_heldout" in r.data.tags)
    assert held == ["ham", "isic", "pooled"]
    final = [r for r in children if r.data.tags.get("crossval_final") == "true"]
    assert len(final) == 1 and final[0].data.tags["threshold_rule"] == "crossval"
    assert final[0].data.metrics["threshold_validation_sensitivity"] == pytest.approx(summary["travel_sensitivity"])
    metrics = client.get_run(parent.info.run_id).data.metrics
    for source in held:
        for name in ("auc", "sensitivity", "specificity", "auc_ci_low", "specificity_ci_high"):
            assert f"heldout_{source}_{name}" in metrics
    aucs = [metrics[f"heldout_{s}_auc"] for s in held]
    assert metrics["crossval_worst_auc"] == min(aucs)
    assert metrics["crossval_mean_auc"] == pytest.approx(np.mean(aucs))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "crossval")}
    assert {"crossval/heldout_auc.png", "crossval/crossval.json"} <= artifacts
    assert client.get_run(parent.info.run_id).data.tags["model_uri"] == summary["model_uri"]
    card = mlflow.artifacts.load_text(f"runs:/{final[0].info.run_id}/model_card.md")
    assert "Rule: the threshold that travels" in card and "| isic |" in card
    for source in held:  # the in-scope check keeps the stated share of every source's photos, not only of all
        assert final[0].data.metrics[f"scope_val_{source}_in_scope"] >= IN_SCOPE_SHARE
        assert f"validation, {source} " in card
    served = load_logged_model(summary["model_uri"])
    assert served.rule.name == "crossval" and served.threshold == pytest.approx(summary["final_threshold"])
    assert served.rule.validation_sensitivity == pytest.approx(summary["travel_sensitivity"])


def test_crossval_refuses_one_source_and_warns_of_a_one_class_source(sources, tmp_path, caplog):
    with mlflow.start_run(), pytest.raises(DataError, match="at least two sources.*pooled"):
        run_crossval(TrainConfig(model="cnn", data=str(sources["pooled"]), img_size=32))
    # A site with nevi only (the metadata layout allows one class): held out, it gets a warning
    # naming it and what is missing, and only its specificity.
    nevi = write_metadata_dataset(tmp_path / "nevi_site", lesions=6, seed=7)
    text = (nevi / "HAM10000_metadata.csv").read_text().replace(",mel", ",nv")
    (nevi / "HAM10000_metadata.csv").write_text(text)
    cfg = TrainConfig(model="cnn", data=f"{sources['pooled']},{sources['isic']},{nevi}", epochs=1, img_size=32,
                      batch_size=16, gradcam_images=0, bootstrap=0)
    with caplog.at_level(logging.WARNING), mlflow.start_run():
        summary = run_crossval(cfg, CrossvalSettings(final=False))
    assert "held-out source 'nevi_site' has no malignant images" in caplog.text
    assert "heldout_nevi_site_specificity" in summary and "heldout_nevi_site_auc" not in summary
    # Two sources, one of them with nevi only: without it the rest can be trained, without the
    # other not, and the error says which source cannot be held out.
    with mlflow.start_run(), pytest.raises(DataError, match="without source 'pooled' the training data has no "
                                                            "malignant images"):
        run_crossval(TrainConfig(**{**cfg.__dict__, "data": f"{sources['pooled']},{nevi}"}))
    with mlflow.start_run(), pytest.raises(ValueError, match="leave holdout_source empty"):
        run_crossval(TrainConfig(**{**cfg.__dict__, "holdout_source": "pooled"}))
