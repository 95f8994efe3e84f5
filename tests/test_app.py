"""`melanoma app`: the page in a real headless Chromium, and its JSON endpoint."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from melanoma.servers import background_server, free_port
from tests.components import CHROMIUM, launch_chromium, require

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app_url(trained_runs):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{trained_runs.root / 'mlflow.db'}"}
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "melanoma.cli", "app", "--model", f"runs:/{trained_runs.cnn}/model",
               "--port", url.rsplit(":", 1)[1]]
    with background_server(command, url, env):
        yield url


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def lesion_base64(demo_root) -> str:
    """A photo of the demo set the model was trained on (in scope), 64 px."""
    return base64.b64encode(next((demo_root / "test" / "malignant").glob("*.jpg")).read_bytes()).decode()


def jpeg(shape=(120, 160, 3)) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_the_endpoint_answers_like_the_served_model_and_names_what_is_wrong(app_url, demo_root):
    status, answer = post(app_url, json.dumps({"image": base64.b64encode(jpeg()).decode()}).encode())
    assert status == 200 and 0 <= answer["malignant_probability"] <= 1
    # Noise is no dermoscopy photo: its probability is kept, its label says so, and the page says why.
    assert answer["scope_check"] == "out of scope" and answer["in_scope"] is False
    assert answer["label"] == "out of scope" and "does not look like a dermoscopy photo" in answer["scope_in_words"]
    assert "the threshold that finds 90% of the melanomas in the model's validation set" in answer["in_words"]
    status, lesion = post(app_url, json.dumps({"image": lesion_base64(demo_root)}).encode())
    expected = "malignant" if lesion["malignant_probability"] >= lesion["threshold"] else "benign"
    assert status == 200 and lesion["scope_check"] == "in scope" and lesion["label"] == expected
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(answer["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (120, 160, 3)  # on the photo, at its size
    tiny = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()
    for body, message in ((json.dumps({"image": base64.b64encode(tiny).decode()}).encode(), "at least 32x32"),
                          (json.dumps({"image": base64.b64encode(b"hello").decode()}).encode(), "not a recognised image"),
                          (b"{not json", "needs JSON"), (json.dumps({"picture": "x"}).encode(), "needs JSON")):
        status, answer = post(app_url, body)
        assert status == 400 and message in answer["error"], answer


def test_the_page_scores_an_uploaded_photo_and_shows_errors_in_words(app_url, demo_root, tmp_path):
    require(Path(CHROMIUM).exists() and shutil.which("chromium") is not None, "Debian's chromium (/usr/bin/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None, "the playwright package (pip install -e '.[dev]')")
    photo, text = tmp_path / "lesion.jpg", tmp_path / "notes.txt"
    photo.write_bytes(base64.b64decode(lesion_base64(demo_root)))
    text.write_text("this is not a photo")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page()
        page.goto(app_url)
        page.wait_for_selector("#card table, #card p", timeout=30_000)  # the model card arrived
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#result", state="visible", timeout=60_000)
        probability = float(page.inner_text("#probability").rstrip(" %"))
        assert 0 <= probability <= 100
        threshold = float(page.inner_text("#in-words").split("operating threshold ")[1].split("%")[0])
        assert page.inner_text("#label") == ("malignant" if probability >= threshold else "benign")
        assert "operating threshold" in page.inner_text("#in-words")
        page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
        assert page.evaluate("document.getElementById('overlay').naturalWidth") == 64  # the photo's own size
        assert "In scope" in page.inner_text("#scope") and "dermoscopy photos only" in page.inner_text("#scope")
        assert page.inner_text("#error") == ""

        noise = tmp_path / "flower.jpg"  # not a dermoscopy photo: the page says so in words
        noise.write_bytes(jpeg((200, 300, 3)))
        page.set_input_files("#file", str(noise))
        page.wait_for_function("document.getElementById('label').textContent === 'out of scope'", timeout=60_000)
        assert "does not look like a dermoscopy photo" in page.inner_text("#scope")
        assert page.get_attribute("#scope", "class") == "warning"

        page.set_input_files("#file", str(text))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "notes.txt" in page.inner_text("#error") and "not a recognised image" in page.inner_text("#error")
        assert "Traceback" not in page.content()
        assert not page.is_visible("#result")
        browser.close()
