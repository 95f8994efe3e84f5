"""Servers on loopback for the benchmark, the tests and the experiments: a free port, a
background process answering a health check, and `mlflow models serve` on a model URI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import NamedTuple


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(url: str, path: str = "/ping") -> bool:
    try:
        with urllib.request.urlopen(url + path, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def background_server(command: list[str], url: str, env: dict[str, str] | None = None,
                      timeout: float = 180, ready: str = "/ping") -> Iterator[subprocess.Popen]:
    """Run ``command`` (a server answering ``url`` + ``ready``) for the duration of the block."""
    server = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not ping(url, ready):
            if server.poll() is not None:
                raise RuntimeError(f"{' '.join(command[:4])} exited with code {server.returncode}")
            if time.time() > deadline:
                raise TimeoutError(f"{' '.join(command[:4])} did not answer within {timeout:.0f} s")
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


class ServedModel(NamedTuple):
    url: str
    pid: int  # the `mlflow models serve` process; its workers are its descendants


@contextlib.contextmanager
def model_server(model_uri: str, env: dict[str, str] | None = None, timeout: float = 180,
                 options: tuple[str, ...] = ()) -> Iterator[ServedModel]:
    """`mlflow models serve` (with ``options``) on a free loopback port for the duration of the
    block."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "-p", url.rsplit(":", 1)[1],
               "--env-manager", "local", *options]
    with background_server(command, url, env, timeout) as server:
        yield ServedModel(url, server.pid)


def post_images(url: str, encoded: list[str]) -> bytes:
    payload = {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()
