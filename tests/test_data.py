import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import melanoma.data.dataset as dataset_module
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.data.dataset import prepare_dataset, split_train_val
from melanoma.data.demo import make_demo_dataset
from melanoma.data.layout import discover
from melanoma.data.records import CLASSES, DataError, Source

SPEC = PreprocessSpec(img_size=32, channels=3)


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo set that a test may modify."""
    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def test_discovers_the_kaggle_layout(demo_root):
    records = discover(Source(demo_root))
    counts = {(r.split, CLASSES[r.label]) for r in records}
    assert counts == {("train", "benign"), ("train", "malignant"), ("test", "benign"), ("test", "malignant")}
    assert sum(r.split == "train" for r in records) == 32
    assert all(r.path.endswith(".jpg") for r in records)


def test_reads_the_dataset_zip_with_its_top_folder(demo_root, tmp_path):
    archive = tmp_path / "melanoma.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in demo_root.rglob("*.jpg"):
            zf.write(file, Path("melanoma_cancer_dataset") / file.relative_to(demo_root))
    data = prepare_dataset(archive, SPEC)
    assert data.images.shape == (40, 3, 32, 32)
    assert data.class_counts(data.indices("train")) == {"benign": 16, "malignant": 16}


def test_a_missing_folder_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*train/benign"):
        prepare_dataset(tmp_path / "nowhere", SPEC)


def test_an_empty_class_folder_is_named(demo_copy):
    shutil.rmtree(demo_copy / "train" / "benign")
    (demo_copy / "train" / "benign").mkdir()
    with pytest.raises(DataError, match=r"no train/benign|class 'benign' has no images"):
        prepare_dataset(demo_copy, SPEC)


def test_a_folder_without_the_layout_is_refused(tmp_path):
    (tmp_path / "pictures").mkdir()
    cv2.imwrite(str(tmp_path / "pictures" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"no train/benign and train/malignant.*Expected the Kaggle layout"):
        prepare_dataset(tmp_path / "pictures", SPEC)


def test_a_class_without_images_is_named(demo_copy):
    shutil.rmtree(demo_copy / "train" / "malignant")
    (demo_copy / "train" / "malignant").mkdir()
    (demo_copy / "train" / "malignant" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class 'malignant' has no readable images in train/malignant"):
        prepare_dataset(demo_copy, SPEC)


def test_corrupt_and_non_image_files_are_skipped_and_counted(demo_copy):
    good = (demo_copy / "train" / "benign" / "benign_0000.jpg").read_bytes()
    (demo_copy / "train" / "benign" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (demo_copy / "train" / "benign" / "README.txt").write_text("not an image")
    (demo_copy / "train" / "malignant" / "empty.jpg").write_bytes(b"")
    data = prepare_dataset(demo_copy, SPEC)
    assert sorted(Path(p).name for p in data.skipped) == ["README.txt", "empty.jpg", "truncated.jpg"]
    assert len(data.labels) == 40


def test_second_preparation_reads_the_cache_without_decoding(demo_root, monkeypatch):
    first = prepare_dataset(demo_root, SPEC)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(dataset_module, "load_for_model", no_decoding)
    second = prepare_dataset(demo_root, SPEC)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.digest == second.digest


def test_a_changed_file_or_setting_invalidates_the_cache(demo_copy):
    first = prepare_dataset(demo_copy, SPEC)
    assert prepare_dataset(demo_copy, PreprocessSpec(img_size=40)).images.shape[-1] == 40
    assert prepare_dataset(demo_copy, PreprocessSpec(img_size=32, channels=1)).images.shape[1] == 1
    target = demo_copy / "train" / "benign" / "benign_0001.jpg"
    cv2.imwrite(str(target), np.full((64, 64, 3), 255, np.uint8))
    changed = prepare_dataset(demo_copy, SPEC)
    assert changed.digest != first.digest
    index = changed.paths.index("train/benign/benign_0001.jpg")
    assert changed.images[index].min() > 200


def test_split_is_stratified_seeded_and_keeps_duplicates_together(demo_copy):
    source = demo_copy / "train" / "malignant" / "malignant_0000.jpg"
    shutil.copy(source, demo_copy / "train" / "malignant" / "copy_of_0000.jpg")
    data = prepare_dataset(demo_copy, SPEC)
    fit, val = split_train_val(data, 0.25, seed=3)
    assert set(fit).isdisjoint(val) and len(fit) + len(val) == len(data.indices("train"))
    assert set(data.labels[val]) == {0, 1}
    assert abs(data.labels[val].mean() - 0.5) < 0.15
    fit2, val2 = split_train_val(data, 0.25, seed=3)
    np.testing.assert_array_equal(val, val2)
    pair = [data.paths.index(p) for p in ("train/malignant/malignant_0000.jpg", "train/malignant/copy_of_0000.jpg")]
    assert (pair[0] in val) == (pair[1] in val)


def test_evaluation_layouts_single_class_and_class_folders(demo_root, tmp_path):
    benign_only = prepare_dataset(demo_root / "test" / "benign", SPEC, require_train=False)
    assert set(benign_only.labels) == {0} and len(benign_only.labels) == 4
    flat = Path(shutil.copytree(demo_root / "test", tmp_path / "flat"))
    both = prepare_dataset(flat, SPEC, require_train=False)
    assert sorted(set(both.labels)) == [0, 1]
    (tmp_path / "unlabelled").mkdir()
    cv2.imwrite(str(tmp_path / "unlabelled" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="no images found.*benign/ and/or <root>/malignant/"):
        prepare_dataset(tmp_path / "unlabelled", SPEC, require_train=False)


def test_demo_data_is_deterministic_per_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", per_class=2, seed=5, size=32)
    b = make_demo_dataset(tmp_path / "b", per_class=2, seed=5, size=32)
    for file in a.rglob("*.jpg"):
        assert file.read_bytes() == (b / file.relative_to(a)).read_bytes()
