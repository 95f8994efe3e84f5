"""Score an archive of images on Spark through the logged model (``mlflow.pyfunc.spark_udf``).

    python serve/spark_score.py --model models:/melanoma-classifier@champion \\
        --images /data/archive --out predictions.parquet [--master local[4]]

or the same file with ``spark-submit`` on a cluster. Reads every JPEG/PNG under ``--images``
(Spark's ``binaryFile`` source, recursively), scores them in Arrow batches of ``--batch-rows``
through the same pyfunc as ``mlflow models serve`` and ``melanoma predict``, and writes path,
probabilities and label per image. A file the model refuses fails its batch: for archives with
broken files use ``melanoma predict``, which gives such files an error row. Needs PySpark
(``pip install 'melanoma[spark]'``) and Java 17.
"""

from __future__ import annotations

import argparse
import time

RESULT_TYPE = ("malignant_probability double, benign_probability double, label string, in_scope boolean, "
               "scope_score double, scope_check string")


def score_images(spark, model_uri: str, images: str, batch_rows: int = 64):
    """A DataFrame of ``path`` and the model's columns for every JPEG/PNG under ``images``."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    # The served model takes at most 500 rows per call; Arrow would send 10,000.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    # Spark 4's base64() wraps lines every 76 characters; models logged before melanoma accepted
    # wrapped base64 refuse it.
    spark.conf.set("spark.sql.chunkBase64String.enabled", "false")
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", "*.{jpg,jpeg,JPG,JPEG,png,PNG}").load(images))
    classify = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE, env_manager="local")
    scored = files.select("path", classify(F.base64("content").alias("image")).alias("prediction"))
    return scored.select("path", "prediction.*")


def main(argv: list[str] | None = None) -> int:
    from pyspark.sql import SparkSession

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/melanoma-classifier@champion")
    parser.add_argument("--images", required=True, help="folder (local, HDFS, S3, ...) of JPEG/PNG files")
    parser.add_argument("--out", required=True, help="Parquet output")
    parser.add_argument("--master", default=None, help="e.g. local[4]; spark-submit sets it otherwise")
    parser.add_argument("--batch-rows", type=int, default=64)
    args = parser.parse_args(argv)
    builder = SparkSession.builder.appName("melanoma-score")
    spark = (builder.master(args.master) if args.master else builder).getOrCreate()
    start = time.perf_counter()
    scored = score_images(spark, args.model, args.images, args.batch_rows)
    scored.write.mode("overwrite").parquet(args.out)
    count = spark.read.parquet(args.out).count()
    seconds = time.perf_counter() - start
    print(f"scored {count} images in {seconds:.1f} s ({count / seconds:.1f} img/s) -> {args.out}")
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
