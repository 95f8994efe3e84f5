"""`melanoma predict`: files, folders and CSVs through the logged model, streamed and resumable."""

from __future__ import annotations

import csv
import subprocess
import sys

import cv2
import numpy as np
import pytest

from melanoma.batch import explained_name, image_paths, predict_files


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "clinic_b").mkdir(parents=True)
    for i, shape in enumerate([(60, 80, 3), (64, 64, 3), (90, 120, 3)]):
        cv2.imwrite(str(folder / f"lesion_{i}.jpg"), rng.integers(0, 255, shape, dtype=np.uint8))
    cv2.imwrite(str(folder / "clinic_b" / "lesion_0.png"), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "tiny.png").write_bytes(cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes())
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def read(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_folder_is_scored_row_by_row_with_errors_in_their_rows(trained_runs, monkeypatch, photos, tmp_path):
    trained_runs.activate(monkeypatch)
    out = tmp_path / "out" / "predictions.csv"
    counts = predict_files(f"runs:/{trained_runs.cnn}/model", [photos], out, chunk_size=2)
    rows = {r["path"]: r for r in read(out)}
    threshold = counts.pop("threshold")
    assert counts.pop("threshold_rule") == "the threshold that finds 90% of the melanomas in the model's validation set"
    assert counts == {"scored": 4, "errors": 2, "skipped_already_done": 0}
    assert set(rows) == {str(p) for p in image_paths([photos])} and len(rows) == 6
    assert "not a recognised image" in rows[str(photos / "broken.jpg")]["error"]
    assert "needs at least 32x32" in rows[str(photos / "tiny.png")]["error"]
    good = rows[str(photos / "lesion_0.jpg")]  # noise: scored, and out of scope
    assert good["error"] == "" and good["scope_check"] == "out of scope" and good["label"] == "out of scope"
    assert float(good["scope_score"]) > 0 and threshold > 0
    assert float(good["malignant_probability"]) + float(good["benign_probability"]) == pytest.approx(1)


def test_a_rerun_skips_what_is_done_and_a_csv_of_paths_works(trained_runs, monkeypatch, photos, tmp_path):
    trained_runs.activate(monkeypatch)
    out, listing = tmp_path / "predictions.csv", tmp_path / "list.csv"
    listing.write_text("path,patient\nphotos/lesion_1.jpg,p1\nphotos/clinic_b/lesion_0.png,p2\n")
    model = f"runs:/{trained_runs.cnn}/model"
    assert predict_files(model, [listing], out)["scored"] == 2
    counts = predict_files(model, [photos], out)  # the two the listing named are done already
    assert counts["skipped_already_done"] == 2 and counts["scored"] + counts["errors"] == 4
    assert sorted(r["path"] for r in read(out)) == sorted(str(p) for p in image_paths([photos]))
    assert predict_files(model, [photos], out) == {"scored": 0, "errors": 0, "skipped_already_done": 6}


def test_explanations_are_written_as_original_beside_overlay(trained_runs, monkeypatch, photos, tmp_path):
    trained_runs.activate(monkeypatch)
    explain = tmp_path / "explained"
    predict_files(f"runs:/{trained_runs.cnn}/model", [photos / "lesion_2.jpg"], tmp_path / "p.csv", explain)
    (written,) = explain.iterdir()
    assert written.name == explained_name(photos / "lesion_2.jpg")
    assert cv2.imread(str(written)).shape == (90, 240, 3)  # the 120x90 photo twice


def test_the_command_names_a_missing_path(trained_runs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "melanoma.cli", "predict", "--model", "runs:/x/model",
                             str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such file or folder" in result.stderr
