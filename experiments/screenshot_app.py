"""Take the README's screenshot of `melanoma app`: headless Chromium, one photo uploaded.

    python -m experiments.screenshot_app --model models:/melanoma-classifier@champion \\
        --photo lesion.jpg --out docs/app.png

Without ``--photo`` it uploads a synthetic demo lesion (no patient photo in the repository).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from playwright.sync_api import sync_playwright

from melanoma.data.demo import synthetic_lesion
from melanoma.servers import background_server, free_port

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--photo", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/app.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo
        if photo is None:
            photo = Path(tmp) / "synthetic_lesion.jpg"
            rgb = synthetic_lesion(np.random.default_rng(7), malignant=True, size=480)
            cv2.imwrite(str(photo), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "melanoma.cli", "app", "--model", args.model, "--port", url.rsplit(":", 1)[1]]
        with background_server(command, url), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(url)
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#result", state="visible", timeout=120_000)
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
            page.screenshot(path=str(args.out), full_page=False)
            print(page.inner_text("#in-words"))
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
