"""The settings sweep: overrides, one row per setting, and no MLflow needed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import sweep
from melanoma.config import TrainConfig


def test_overrides_are_typed_and_checked():
    cfg = sweep.apply_overrides(TrainConfig(), "img_size=64 crop_lesion=false model=resnet18 lr=3e-4")
    assert (cfg.img_size, cfg.crop_lesion, cfg.model, cfg.lr) == (64, False, "resnet18", 3e-4)
    assert sweep.apply_overrides(TrainConfig(), "") == TrainConfig()
    with pytest.raises(ValueError, match="imgsize=64"):
        sweep.apply_overrides(TrainConfig(), "imgsize=64")
    with pytest.raises(ValueError, match="augment"):
        sweep.apply_overrides(TrainConfig(), "augment=sideways")


def test_sweep_trains_every_setting_and_scores_external_folders(demo_root, tmp_path):
    out = tmp_path / "sweep.json"
    rows = sweep.main(["--data", str(demo_root), "--external", str(demo_root / "test" / "benign"),
                       "--img_size", "32", "--epochs", "1", "--gradcam_images", "0", "--out", str(out),
                       "", "channels=1 crop_lesion=false"])
    assert [r["setting"] for r in rows] == ["", "channels=1 crop_lesion=false"]
    assert json.loads(out.read_text()) == rows
    for row in rows:
        assert 0 <= row["val_auc"] <= 1 and 0 <= row["external_benign_specificity"] <= 1
        assert row["external_benign_count"] == 4 and "external_benign_auc" not in row
        assert row["train_images_per_s"] > 0


def test_a_bad_setting_stops_the_sweep_before_any_training(demo_root, tmp_path):
    with pytest.raises(ValueError, match="epochs must be positive"):
        sweep.main(["--data", str(demo_root), "--out", str(tmp_path / "s.json"), "", "epochs=0"])
    assert not (tmp_path / "s.json").exists()


def test_the_sweep_runs_without_mlflow():
    blocked = "import sys; sys.modules['mlflow'] = None; import experiments.sweep"
    subprocess.run([sys.executable, "-c", blocked], check=True, cwd=Path(__file__).parents[1])
