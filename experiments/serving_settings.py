"""Screen `mlflow models serve` settings under load: workers, threads per worker, images per request.

For each setting a fresh server of the model is started on loopback, warmed up, and driven by
serve/loadtest.py (the real script, as a subprocess); the in-process figure it is compared with
(the logged pyfunc scoring one image per call, as `melanoma bench`'s predict figure) is measured
before and after the servers, in the same process as the screen.

    python -m experiments.serving_settings --model models:/melanoma-classifier@champion \\
        --images ../shared/data/melanoma10k/train --out docs/serving_load_cpu.json \\
        "workers=1 threads=2" "workers=2 threads=1" "workers=1 threads=2 batch=8"

A setting is ``key=value`` words: workers, threads (OMP_NUM_THREADS per worker), batch (images
per request), timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), concurrency, requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd

from melanoma.servers import model_server

LOADTEST = Path(__file__).resolve().parents[1] / "serve" / "loadtest.py"
DEFAULTS = {"workers": 1, "threads": 2, "batch": 1, "timeout": 60, "concurrency": 8, "requests": 2000}


def parse_setting(words: str) -> dict:
    setting = dict(DEFAULTS)
    for word in words.split():
        key, value = word.split("=", 1)
        if key not in DEFAULTS:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(DEFAULTS)}")
        setting[key] = int(value)
    return setting


def in_process_predict(model_uri: str, files: list[Path], calls: int = 300) -> dict:
    """The logged pyfunc on one image per call, in this process: ms per call and images/s."""
    model = mlflow.pyfunc.load_model(model_uri)
    frames = [pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode()]}) for f in files[:50]]
    for frame in frames[:10]:
        model.predict(frame)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        model.predict(frames[i % len(frames)])
        times.append(time.perf_counter() - start)
    return {"predict_one_ms_p50": round(1000 * statistics.median(times), 2),
            "predict_one_img_per_s": round(calls / sum(times), 1)}


def load(model_uri: str, images: Path, setting: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(setting["threads"]),
           "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(setting["timeout"])}
    with model_server(model_uri, env, options=("--workers", str(setting["workers"]))) as (url, pid), \
            tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        subprocess.run([sys.executable, str(LOADTEST), "--url", url, "--images", str(images), "--concurrency",
                        str(setting["concurrency"]), "--requests", str(setting["requests"]), "--batch",
                        str(setting["batch"]), "--server-pid", str(pid), "--out", str(out)], check=False, timeout=900)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("settings", nargs="+")
    args = parser.parse_args()
    files = sorted(args.images.rglob("*.jpg"))[:50]
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "model": args.model, "in_process_before": in_process_predict(args.model, files), "settings": []}
    for words in args.settings:
        setting = parse_setting(words)
        results["settings"].append({"setting": setting, **load(args.model, args.images, setting)})
        print(json.dumps(results["settings"][-1]), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["in_process_after"] = in_process_predict(args.model, files)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
