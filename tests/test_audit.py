import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from melanoma.audit import audit_dataset, border_features, ring_mask
from melanoma.cli import main


@pytest.fixture
def leaky_copy(demo_root: Path, tmp_path: Path) -> Path:
    """The demo set with a dark dermoscope vignette on every malignant photo only, plus one exact
    and one near duplicate."""
    root = Path(shutil.copytree(demo_root, tmp_path / "leaky"))
    for path in (root / "train" / "malignant").glob("*.jpg"):
        image = cv2.imread(str(path))
        h, w = image.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (w // 2, h // 2), int(min(h, w) * 0.48), 1, -1)
        cv2.imwrite(str(path), image * mask[..., None])
    benign = root / "train" / "benign"
    shutil.copy(benign / "benign_0000.jpg", benign / "exact_copy.jpg")
    photo = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    photo = cv2.resize(photo, (64, 64), interpolation=cv2.INTER_CUBIC)  # structure at every scale
    cv2.imwrite(str(benign / "photo.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(benign / "near_copy.jpg"), cv2.convertScaleAbs(photo, alpha=1.05, beta=3),
                [cv2.IMWRITE_JPEG_QUALITY, 60])
    return root


def test_ring_mask_keeps_only_the_border():
    mask = ring_mask(20, 0.15)
    assert mask[0].all() and mask[:, -1].all() and not mask[10, 10]
    assert border_features(np.zeros((2, 3, 20, 20), np.uint8)).shape[0] == 2


def test_audit_finds_a_border_shortcut_and_duplicates(leaky_copy):
    report = audit_dataset(leaky_copy, img_size=32)
    assert report["border_probe_auc"] > 0.9
    assert "SHORTCUT RISK" in report["verdict"]
    assert report["exact_duplicate_pairs"] == 1
    assert report["near_duplicate_pairs"] >= 1
    stats = report["class_statistics"]
    assert stats["malignant"]["dark_corner_share"] == 0.8  # the 16 train images of 20, not test/
    assert stats["benign"]["dark_corner_share"] == 0
    assert stats["benign"]["original_sizes"] == {"64x64": 23}  # 16 + 4 test + 3 added


def test_audit_of_clean_data_sees_no_border_signal(tmp_path):
    """Same skin tones in both classes; the classes differ only in the lesion in the middle."""
    rng = np.random.default_rng(0)
    for label, colour in (("benign", (60, 90, 140)), ("malignant", (30, 30, 40))):
        folder = tmp_path / "clean" / "train" / label
        folder.mkdir(parents=True)
        for i in range(40):
            image = np.full((64, 64, 3), rng.integers(120, 230, 3), np.uint8)
            image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
            cv2.circle(image, (32, 32), 12, colour, -1)
            cv2.imwrite(str(folder / f"{i}.jpg"), image)
    report = audit_dataset(tmp_path / "clean", img_size=32)
    assert report["border_probe_auc"] < 0.8
    assert report["exact_duplicate_pairs"] == 0


def test_audit_command_writes_json_and_figure(leaky_copy, tmp_path, capsys):
    out, figure = tmp_path / "audit.json", tmp_path / "audit.png"
    assert main(["audit", "--data", str(leaky_copy), "--out", str(out), "--report", str(figure), "--img-size", "32"]) == 0
    saved = json.loads(out.read_text())
    for key in ("border_probe_auc", "exact_duplicate_pairs", "near_duplicate_pairs", "verdict", "class_statistics"):
        assert key in saved
    assert figure.stat().st_size > 10_000
    assert "SHORTCUT RISK" in capsys.readouterr().out


def test_audit_command_reports_a_bad_path(tmp_path, capsys):
    assert main(["audit", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
