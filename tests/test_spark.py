"""Batch scoring on a real local Spark session gives what `melanoma predict` gives."""

from __future__ import annotations

import csv
import importlib.util
import shutil

import cv2
import numpy as np
import pytest

from melanoma.batch import predict_files
from tests.components import require, serve_script

pytestmark = pytest.mark.e2e


def test_the_spark_udf_scores_an_archive_like_melanoma_predict(trained_runs, monkeypatch, tmp_path):
    require(importlib.util.find_spec("pyspark") is not None, "PySpark (pip install -e '.[dev]')")
    require(shutil.which("java") is not None, "Java 17 for Spark")
    from pyspark.sql import SparkSession

    trained_runs.activate(monkeypatch)
    archive = tmp_path / "archive"
    (archive / "2024").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(7):
        folder = archive / "2024" if i % 2 else archive
        cv2.imwrite(str(folder / f"lesion_{i}.{'png' if i == 3 else 'jpg'}"),
                    rng.integers(0, 255, (60 + i, 80, 3), dtype=np.uint8))
    model = f"runs:/{trained_runs.cnn}/model"
    predict_files(model, [archive], tmp_path / "predictions.csv")
    with (tmp_path / "predictions.csv").open(newline="") as handle:
        expected = {row["path"]: row for row in csv.DictReader(handle)}

    spark = (SparkSession.builder.master("local[1]").appName("melanoma-test")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1").getOrCreate())
    try:
        rows = serve_script("spark_score").score_images(spark, model, str(archive), batch_rows=3).collect()
    finally:
        spark.stop()
    assert len(rows) == 7
    for row in rows:
        local = expected[row.path.removeprefix("file:")]
        assert row.malignant_probability == pytest.approx(float(local["malignant_probability"]), abs=1e-6)
        assert row.label == local["label"]
