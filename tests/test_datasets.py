"""Several datasets: the metadata layout, copies across datasets, splits that cannot leak,
per-source metrics, leave-one-source-out and source balancing."""

import csv
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from melanoma.audit import audit_dataset
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.config import TrainConfig
from melanoma.data.combine import copy_pairs, load_datasets, parse_datasets, perceptual_hashes
from melanoma.data.dataset import prepare_dataset, split_train_val
from melanoma.data.demo import make_demo_dataset, synthetic_lesion
from melanoma.data.records import DataError
from melanoma.train import sample_weights
from melanoma.workflows.training import run_training

SPEC = PreprocessSpec(img_size=32, channels=3, color_constancy=False)


def write_metadata_dataset(root: Path, lesions: int = 12, photos: int = 2, seed: int = 0,
                           extra_rows: list[dict] | None = None, size: tuple[int, int] = (80, 60),
                           lesions_per_patient: int = 0, last_dx: str = "bkl") -> Path:
    """HAM10000's layout: images/<image_id>.jpg (4:3) and a CSV with lesion_id, image_id, dx;
    ``photos`` per lesion, half the lesions mel, half nv, and one ``last_dx`` (bkl: left out by
    default). With ``lesions_per_patient`` a patient_id column too, as ISIC 2020's: each patient
    has that many consecutive lesions, so of both classes."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for lesion in range(lesions + 1):
        dx = last_dx if lesion == lesions else ("mel" if lesion % 2 else "nv")
        base = synthetic_lesion(rng, malignant=dx == "mel", size=96)
        for k in range(photos):
            image_id = f"ISIC_{seed}{lesion:03d}{k}"
            photo = cv2.resize(np.roll(base, 3 * k, axis=1), size)
            cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
            rows.append({"lesion_id": f"HAM_{seed}{lesion:04d}", "image_id": image_id, "dx": dx})
            if lesions_per_patient:
                rows[-1]["patient_id"] = f"IP_{seed}{lesion // lesions_per_patient:04d}"
    rows += extra_rows or []
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["lesion_id", "image_id", "dx"] + ["patient_id"] * bool(lesions_per_patient))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Path:
    return write_metadata_dataset(tmp_path_factory.mktemp("ham") / "ham")


def test_the_metadata_layout_is_detected_with_lesions_and_the_label_map(ham, caplog):
    data = prepare_dataset(ham, SPEC, use_cache=False)
    assert len(data.labels) == 24 and set(data.labels) == {0, 1}  # the bkl lesion is left out, and said so
    assert "left out 2 rows" in caplog.text and "'bkl': 2" in caplog.text
    assert len(set(data.groups)) == 12 and set(data.sources) == {"ham"}
    wider = prepare_dataset(ham, SPEC, use_cache=False, label_map="mel:malignant,nv:benign,bkl:benign")
    assert len(wider.labels) == 26 and (wider.labels == 0).sum() == 14


def test_a_lesions_photos_stay_on_one_side_of_the_split(ham):
    data = prepare_dataset(ham, SPEC, use_cache=False)
    for seed in range(5):
        fit, val = split_train_val(data, 0.3, seed)
        assert not set(data.groups[fit]) & set(data.groups[val])
        assert set(data.labels[val]) == {0, 1}


def test_a_patients_photos_stay_on_one_side_of_the_split(tmp_path):
    root = write_metadata_dataset(tmp_path / "isic2020", lesions=24, lesions_per_patient=3)
    data = prepare_dataset(root, SPEC, use_cache=False)
    assert len(set(data.groups)) == 8  # grouped by patient, not by lesion
    patient = {Path(p).stem: g for p, g in zip(data.paths, data.groups)}
    assert patient["ISIC_00000"] == patient["ISIC_00020"] != patient["ISIC_00030"]  # lesions 0 and 2, not 3
    for seed in range(5):
        fit, val = split_train_val(data, 0.3, seed)
        assert not set(data.groups[fit]) & set(data.groups[val])


def test_unknown_diagnoses_are_left_out_and_counted_unless_the_label_map_names_them(tmp_path, caplog):
    root = write_metadata_dataset(tmp_path / "isic2020", lesions=8, last_dx="unknown", lesions_per_patient=2)
    data = prepare_dataset(root, SPEC, use_cache=False)
    assert len(data.labels) == 16 and "'unknown': 2" in caplog.text
    named = prepare_dataset(root, SPEC, use_cache=False, label_map="mel:malignant,nv:benign,unknown:benign")
    assert len(named.labels) == 18 and (named.labels == 0).sum() == 10


def test_a_label_map_that_maps_nothing_in_a_dataset_names_the_dataset(tmp_path, ham):
    only_unknown = write_metadata_dataset(tmp_path / "followed_up", lesions=0, last_dx="unknown")
    with pytest.raises(DataError, match=r"followed_up: the label map 'mel:malignant,nv:benign' maps none of its "
                                        r"diagnoses \({'unknown': 2}"):
        load_datasets(f"{ham},{only_unknown}", SPEC)


def test_copies_are_found_across_sizes_and_aspect_ratios(ham, tmp_path):
    kaggle = make_demo_dataset(tmp_path / "kaggle", per_class=6, seed=3, size=64)
    # Three HAM photos squashed to a square and re-encoded, as the Kaggle set holds them.
    for image in sorted((ham / "images").glob("*.jpg"))[1:6:2]:
        square = cv2.resize(cv2.imread(str(image)), (90, 90), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(kaggle / "train" / "malignant" / f"copy_{image.name}"), square, [cv2.IMWRITE_JPEG_QUALITY, 85])
    data = load_datasets(f"{kaggle},{ham}", SPEC)
    assert data.copies_removed == 3
    assert not any("copy_" in p for p in data.paths)  # the photo stays once: HAM's copy, which knows its lesion
    assert set(data.sources) == {"kaggle", "ham"}
    hashes = perceptual_hashes(np.asarray(data.images))
    assert not [pair for pair in copy_pairs(hashes) if data.sources[pair[0]] != data.sources[pair[1]]]


def test_datasets_are_named_and_two_with_one_name_are_refused(tmp_path):
    assert parse_datasets(f"clinic:{tmp_path}/a,{tmp_path}/b") == [("clinic", f"{tmp_path}/a"), ("b", f"{tmp_path}/b")]
    with pytest.raises(ValueError, match="both named test"):
        parse_datasets(f"{tmp_path}/a/test,{tmp_path}/b/test")


@pytest.mark.parametrize("problem, message", [
    ("no_columns", "needs the columns image_id, dx"),
    ("no_classes", "has no malignant images; with a metadata CSV, check the label map"),
])
def test_bad_metadata_is_named(tmp_path, problem, message):
    root = write_metadata_dataset(tmp_path / "bad", lesions=4)
    csv_file = root / "HAM10000_metadata.csv"
    text = csv_file.read_text()
    if problem == "no_columns":
        csv_file.write_text(text.replace("image_id", "image").replace(",dx", ",diagnosis"))
    else:
        csv_file.write_text(text.replace(",mel", ",melanoma"))
    with pytest.raises(DataError, match=message):
        load_datasets(str(root), SPEC)


def test_ids_without_files_and_files_without_rows_are_counted(tmp_path, caplog):
    root = write_metadata_dataset(tmp_path / "ham", lesions=4,
                                  extra_rows=[{"lesion_id": "HAM_x", "image_id": "ISIC_missing", "dx": "nv"}])
    cv2.imwrite(str(root / "images" / "ISIC_unlisted.jpg"), np.zeros((20, 20, 3), np.uint8))
    data = prepare_dataset(root, SPEC, use_cache=False)
    assert len(data.labels) == 8
    assert "1 rows name an image that is not in" in caplog.text and "ISIC_missing" in caplog.text
    assert "1 image files have no row" in caplog.text and "ISIC_unlisted" in caplog.text


def test_source_balancing_gives_every_source_and_class_the_same_weight():
    labels = np.array([1, 1, 1, 1, 0, 0, 1, 0])
    sources = np.array(["a", "a", "a", "a", "a", "a", "b", "b"])
    weights = sample_weights(labels, sources).numpy()
    for source in "ab":
        for label in (0, 1):
            cell = (sources == source) & (labels == label)
            assert weights[cell].sum() == pytest.approx(len(labels) / 4)
    np.testing.assert_allclose(sample_weights(labels).numpy()[labels == 1].sum(), len(labels) / 2)


def test_group_dro_trains_on_generated_sources_and_logs_each_sources_loss(ham, demo_root):
    cfg = TrainConfig(model="cnn", data=f"{demo_root},{ham}", epochs=2, img_size=32, batch_size=16, gradcam_images=0,
                      bootstrap=0, balance="dro")
    with mlflow.start_run() as run:
        run_training(cfg)
    client = MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    sources = ("ham", demo_root.name)
    for source in sources:
        history = client.get_metric_history(run.info.run_id, f"train_loss_{source}")
        assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    weights = [metrics[f"dro_weight_{source}"] for source in sources]
    assert sum(weights) == pytest.approx(1) and weights[0] != pytest.approx(0.5)
    assert client.get_run(run.info.run_id).data.params["balance"] == "dro"


def test_the_audit_shows_the_source_by_class_table_and_the_confound(ham, tmp_path):
    only_malignant = tmp_path / "clinic" / "malignant"
    make_demo_dataset(tmp_path / "demo", per_class=8, seed=5, size=64)
    kaggle = tmp_path / "demo"
    report = audit_dataset(f"{kaggle},{ham}", img_size=32)
    assert report["sources"]["ham"]["benign"] == 12 and report["sources"]["ham"]["malignant"] == 12
    assert "warning" not in report["sources"]["ham"]
    assert not only_malignant.exists()
    one_class = write_metadata_dataset(tmp_path / "mel_only", lesions=4, seed=2)
    (one_class / "HAM10000_metadata.csv").write_text(
        (one_class / "HAM10000_metadata.csv").read_text().replace(",nv", ",mel"))
    report = audit_dataset(f"{kaggle},{ham},{one_class}", img_size=32, require_train=True)
    assert "every mel_only image is malignant" in report["sources"]["mel_only"]["warning"]
    assert "every mel_only image is malignant" in report["verdict"]


def test_training_on_two_datasets_reports_each_source_and_a_held_out_one(ham, demo_root, tmp_path):
    cfg = TrainConfig(model="cnn", data=f"{demo_root},{ham}", epochs=1, img_size=32, batch_size=16, gradcam_images=0,
                      bootstrap=50, balance="source")
    with mlflow.start_run() as run:
        run_training(cfg)
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    for source in ("ham", demo_root.name):
        assert f"val_{source}_specificity" in metrics and f"val_{source}_count" in metrics
        assert f"audit_{source}_benign" in metrics
    held = TrainConfig(**{**cfg.__dict__, "holdout_source": "ham"})
    with mlflow.start_run() as run:
        run_training(held)
    run = MlflowClient().get_run(run.info.run_id)
    assert run.data.metrics["holdout_ham_count"] == 24 and "holdout_ham_auc" in run.data.metrics
    assert int(run.data.params["data_train_count"]) + int(run.data.params["data_val_count"]) == 32
    with pytest.raises(ValueError, match="none of the data's sources"):
        run_training(TrainConfig(**{**cfg.__dict__, "holdout_source": "nowhere"}))
