"""The pyfunc model in-process: decoding, validation, predictions and explanations."""

import base64
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from melanoma.models import build_model
from melanoma.serving import MelanomaClassifier


@pytest.fixture
def classifier(tmp_path) -> MelanomaClassifier:
    torch.manual_seed(0)
    weights, settings = tmp_path / "weights.pt", tmp_path / "settings.json"
    torch.save(build_model("cnn", 3).state_dict(), weights)
    settings.write_text(json.dumps({"model": "cnn", "threshold": 0.5,
                                    "preprocess": {"img_size": 32, "channels": 3, "color_constancy": True}}))
    model = MelanomaClassifier()
    model.load(weights, settings)
    return model


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encoded(ext: str, shape=(50, 70, 3)) -> bytes:
    image = np.random.default_rng(len(shape)).integers(0, 255, shape, dtype=np.uint8)
    return cv2.imencode(ext, image)[1].tobytes()


def test_predicts_one_row_per_image_for_every_format(classifier):
    files = [encoded(".jpg"), encoded(".png"), encoded(".bmp"), encoded(".png", (40, 40)),
             encoded(".png", (30, 60, 4)), encoded(".jpg", (900, 1200, 3))]
    out = classifier.predict(None, pd.DataFrame({"image": [b64(f) for f in files]}))
    assert list(out.columns) == ["malignant_probability", "benign_probability", "label"]
    assert len(out) == len(files)
    assert out.malignant_probability.between(0, 1).all()
    np.testing.assert_allclose(out.malignant_probability + out.benign_probability, 1.0)
    expected = np.where(out.malignant_probability >= 0.5, "malignant", "benign")
    assert (out.label == expected).all()


def test_the_stored_threshold_decides_the_label(classifier):
    frame = pd.DataFrame({"image": [b64(encoded(".jpg"))]})
    classifier.threshold = 0.0
    assert classifier.predict(None, frame).label[0] == "malignant"
    classifier.threshold = 1.01
    assert classifier.predict(None, frame).label[0] == "benign"


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"picture": ["x"]}), "needs a column 'image'"),
    (pd.DataFrame({"image": []}), "column is empty"),
    (pd.DataFrame({"image": [b64(encoded(".jpg")), "%%%not base64%%%"]}), "row 1: not valid base64"),
    (pd.DataFrame({"image": [b64(b"plain text, no picture")]}), "row 0: not a recognised image"),
    (pd.DataFrame({"image": [""]}), "row 0: empty"),
])
def test_bad_input_names_the_row_and_the_problem(classifier, frame, message):
    with pytest.raises(MlflowException, match=message) as info:
        classifier.predict(None, frame)
    assert info.value.get_http_status_code() == 400


def test_a_decompression_bomb_is_refused(classifier):
    from tests.test_preprocessing import png_claiming_size

    with pytest.raises(MlflowException, match=r"row 0: image (is 80000x80000|refused).*decompression bomb|row 0: image is 80000x80000"):
        classifier.predict(None, pd.DataFrame({"image": [b64(png_claiming_size(80_000, 80_000))]}))


def test_explain_returns_a_decodable_gradcam_png_per_row(classifier):
    frame = pd.DataFrame({"image": [b64(encoded(".jpg")), b64(encoded(".png"))]})
    out = classifier.predict(None, frame, params={"explain": True})
    for value in out.gradcam_png:
        png = cv2.imdecode(np.frombuffer(base64.b64decode(value), np.uint8), cv2.IMREAD_COLOR)
        assert png.shape == (32, 32, 3)
    assert "gradcam_png" not in classifier.predict(None, frame, params={"explain": "false"}).columns
