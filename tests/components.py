"""Real components the tests need (a browser, PostgreSQL, Spark): skipped locally when missing,
never in CI (``CI=true``), where `.ci/run` installs them."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SERVE = Path(__file__).resolve().parents[1] / "serve"


def require(available: bool, what: str) -> None:
    """Skip the test, naming ``what`` is missing; in CI, fail instead."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing, and CI must run this test (.ci/run installs it)")
    pytest.skip(f"{what} is missing")


CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch_chromium(playwright):
    """Debian's Chromium driven by Playwright: nothing downloaded."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def serve_script(name: str) -> ModuleType:
    """A script of serve/ (not a package: users run them as files), imported for testing."""
    spec = importlib.util.spec_from_file_location(f"serve_{name}", SERVE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def postgres_bindir() -> Path | None:
    """Where PostgreSQL's server programs are: beside pg_ctl on PATH, or Debian's
    /usr/lib/postgresql/VERSION/bin (newest first)."""
    import shutil

    candidates = [Path(p).resolve().parent for p in filter(None, [shutil.which("pg_ctl")])]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


@contextlib.contextmanager
def postgres_server(*databases: str) -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL on loopback for the duration of the block, with empty
    ``databases``; yields their URLs by name. As root it runs as the ``postgres`` user
    (PostgreSQL refuses root)."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    from melanoma.servers import free_port

    bindir = postgres_bindir()
    require(bindir is not None, "PostgreSQL's server (Debian package postgresql)")
    require("psycopg" in sys.modules or importlib.util.find_spec("psycopg") is not None,
            "psycopg 3 (pip install -e '.[dev]')")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="melanoma-pg-"))  # not under pytest's root-only folders
    if as_postgres:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
        try:
            for name in databases:
                run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
            yield {name: f"postgresql://postgres@127.0.0.1:{port}/{name}" for name in databases}
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
