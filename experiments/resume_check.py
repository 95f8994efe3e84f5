"""Kill a training run at a random step of epoch 3 and resume it; compare with an uninterrupted twin.

    python -m experiments.resume_check --out docs/resume_check_cpu.json -- \\
        --data ../shared/data/melanoma10k --img_size 64 --epochs 5 --num_threads 1

Both runs train at once (one thread each), in one fresh SQLite store under ``--workdir``; the
twin to be killed gets SIGKILL a random fraction into its epoch 3, then ``melanoma train
--resume`` continues it. Writes the two runs' final metrics and per-epoch histories, and
whether they are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

TIMINGS = ("train_images_per_s", "epoch_seconds")
HISTORY = ("val_auc", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr")


def epochs_logged(client: MlflowClient, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "val_auc")), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("resume-check"))
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: melanoma train's flags")
    args = parser.parse_args()
    flags = [a for a in args.train_args if a != "--"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.workdir.resolve() / 'mlflow.db'}"
    client = MlflowClient()

    def train(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "melanoma.cli", "train", *flags, "--run-name", name, *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    whole, doomed = train("uninterrupted"), train("killed")
    time.sleep(20)
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    killed_id = runs["killed"]
    while epochs_logged(client, killed_id) < 2:
        time.sleep(1)
    t2 = time.time()
    first_epoch = client.get_run(killed_id).data.metrics["epoch_seconds"]
    fraction = random.Random().uniform(0.1, 0.8)
    time.sleep(fraction * first_epoch)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    kill = {"killed_after_epoch_2_s": round(time.time() - t2, 1), "epoch_seconds": round(first_epoch, 1),
            "epochs_logged_at_kill": epochs_logged(client, killed_id),
            "status_after_kill": client.get_run(killed_id).info.status}
    resumed = subprocess.run([sys.executable, "-m", "melanoma.cli", "train", "--resume", killed_id],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    whole.wait()

    def record(run_id: str) -> dict:
        run = client.get_run(run_id)
        history = {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
                   for k in HISTORY}
        return {"status": run.info.status, "history": history,
                "final": {k: v for k, v in sorted(run.data.metrics.items()) if k not in TIMINGS}}

    a, b = record(runs["uninterrupted"]), record(killed_id)
    result = {"train_args": flags, "kill": kill, "resume_exit_code": resumed.returncode,
              "identical_history": a["history"] == b["history"], "identical_final_metrics": a["final"] == b["final"],
              "differing_final_metrics": {k: [a["final"][k], b["final"].get(k)] for k in a["final"]
                                          if a["final"][k] != b["final"].get(k)},
              "uninterrupted": a, "resumed": b}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("uninterrupted", "resumed")}, indent=2))


if __name__ == "__main__":
    main()
