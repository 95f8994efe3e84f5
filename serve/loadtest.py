"""Load-test a served melanoma model on loopback: latency, throughput, errors, server memory.

    python serve/loadtest.py --url http://127.0.0.1:5001 --images photos/ --concurrency 8 \\
        --requests 2000 --server-pid $(pgrep -f "mlflow models serve" | head -1)

Each of ``--concurrency`` clients keeps one connection open and sends requests of ``--batch``
real image files (cycling through ``--images``) until ``--requests`` are done or ``--max-seconds``
have passed. Prints (and with ``--out`` writes) JSON: latency p50/p95/p99 and max in ms,
requests and images per second, errors by kind, and with ``--server-pid`` the resident memory of
the server's process tree before and after. Loopback only: it refuses other hosts.
Standard library only, like serve/client.py.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (Linux /proc), in MB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = (Path("/proc") / str(current) / "status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        todo.extend(children.get(current, []))
    return total_kb / 1024


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def payloads(files: list[Path], batch: int) -> list[bytes]:
    """Request bodies of ``batch`` images each, cycling through ``files``."""
    encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    bodies = []
    for start in range(0, len(encoded), batch):
        rows = [[encoded[(start + i) % len(encoded)]] for i in range(batch)]
        bodies.append(json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode())
    return bodies


def run_load(url: str, bodies: list[bytes], concurrency: int, requests: int, max_seconds: float,
             timeout: float = 60) -> dict:
    """Send ``requests`` requests from ``concurrency`` threads; returns latencies and errors."""
    target = urlparse(url)
    lock, latencies, errors = threading.Lock(), [], Counter()
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
        for i in counter:  # next() on a shared iterator is atomic under the GIL
            if time.perf_counter() > deadline:
                break
            start = time.perf_counter()
            try:
                connection.request("POST", "/invocations", bodies[i % len(bodies)],
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                kind = None if response.status == 200 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                kind = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
            with lock:
                if kind is None:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[kind] += 1
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - started, "latencies": sorted(latencies), "errors": dict(errors)}


def summarize(load: dict, batch: int) -> dict:
    ms = [1000 * s for s in load["latencies"]]
    ok = len(ms)
    return {"requests_ok": ok, "errors": sum(load["errors"].values()), "errors_by_kind": load["errors"],
            "seconds": round(load["seconds"], 2), "requests_per_s": round(ok / load["seconds"], 2),
            "images_per_s": round(ok * batch / load["seconds"], 2),
            **{f"latency_ms_p{q}": round(percentile(ms, q), 1) for q in (50, 95, 99)},
            "latency_ms_max": round(max(ms), 1) if ms else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5001")
    parser.add_argument("--images", type=Path, required=True, help="a folder of JPEG/PNG files, or one file")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    parser.add_argument("--server-pid", type=int, default=None, help="measure this process tree's memory")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"{args.url}: the load test talks to loopback only ({', '.join(sorted(LOOPBACK))})")
    if not 1 <= args.concurrency <= 64 or not 1 <= args.requests <= 100_000:
        parser.error("--concurrency must be 1-64 and --requests 1-100000")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if args.images.is_dir() else [args.images]
    if not files:
        parser.error(f"no JPEG or PNG files in {args.images}")
    bodies = payloads(files[:500], args.batch)
    warm = run_load(args.url, bodies, min(args.concurrency, args.warmup), args.warmup, args.max_seconds)
    if warm["errors"]:
        print(f"error: the warm-up requests failed: {warm['errors']}", file=sys.stderr)
        return 1
    rss_before = process_tree_rss_mb(args.server_pid) if args.server_pid else None
    result = {"url": args.url, "concurrency": args.concurrency, "batch": args.batch, "images": len(files),
              **summarize(run_load(args.url, bodies, args.concurrency, args.requests, args.max_seconds), args.batch)}
    if args.server_pid:
        rss_after = process_tree_rss_mb(args.server_pid)
        result.update(server_rss_mb_before=round(rss_before, 1), server_rss_mb_after=round(rss_after, 1),
                      server_rss_growth=round(rss_after / rss_before - 1, 4))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
