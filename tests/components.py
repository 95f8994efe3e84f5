"""Real components the tests need (a browser, PostgreSQL, Spark): skipped locally when missing,
never in CI (``CI=true``), where `.ci/run` installs them."""

from __future__ import annotations

import importlib.util
import os
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
