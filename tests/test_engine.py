"""The scoring engines: the exported ONNX graph agrees with PyTorch for every registered
architecture, test-time views through the engine equal them in PyTorch, a logged model carries
and serves its graph, and a model without one still serves."""

import base64
import json

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from melanoma.classifier import engine as engines
from melanoma.classifier.architectures import ARCHITECTURES
from melanoma.classifier.calibration import Calibration
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.engine import OnnxEngine, TorchEngine, checked_engine, export_onnx, probability_difference
from melanoma.classifier.inference import Scorer, predict_logits
from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.classifier.pyfunc import MelanomaClassifier
from melanoma.tracking import log_classifier

SPEC = PreprocessSpec(img_size=64, channels=3, color_constancy=False)
CPU = torch.device("cpu")
RULE = ThresholdRule.validation(0.9)


def images(n: int = 6, seed: int = 0, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def trained_like(name: str) -> torch.nn.Module:
    """A small model with non-trivial BatchNorm statistics (as after training), in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, 3)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_exported_graph_agrees_with_pytorch(name):
    scorer = Scorer(trained_like(name), SPEC, "flip")
    engine = OnnxEngine(export_onnx(scorer, 3, 64), views=4)
    batch = images()
    assert probability_difference(scorer, engine, batch) <= engines.TOLERANCE
    assert engine.logits(batch[:1]).shape == (1, 2)  # any batch size: the batch axis is dynamic


def test_test_time_views_through_the_engine_equal_pytorch_and_ignore_a_flip():
    model, batch = trained_like("cnn"), images()
    for tta in ("flip", "dihedral"):
        scorer = Scorer(model, SPEC, tta)
        onnx = OnnxEngine(export_onnx(scorer, 3, 64), views=8).logits(batch)
        with torch.inference_mode():
            reference = scorer(torch.from_numpy(batch))
        torch.testing.assert_close(onnx, reference, atol=1e-4, rtol=1e-4)
        flipped = OnnxEngine(export_onnx(scorer, 3, 64)).logits(np.ascontiguousarray(batch[..., ::-1]))
        torch.testing.assert_close(flipped, onnx, atol=1e-4, rtol=1e-4)
    plain = predict_logits(model, batch, SPEC, CPU)
    assert not torch.allclose(plain, predict_logits(model, batch[..., ::-1].copy(), SPEC, CPU), atol=1e-4)


def test_a_graph_that_differs_is_refused_and_pytorch_scores(monkeypatch):
    scorer, batch = Scorer(trained_like("cnn"), SPEC), images()
    engine, graph, difference = checked_engine(scorer, batch, CPU)
    assert isinstance(engine, OnnxEngine) and graph and difference <= engines.TOLERANCE
    monkeypatch.setattr(engines, "TOLERANCE", -1.0)
    engine, graph, difference = checked_engine(scorer, batch, CPU)
    assert isinstance(engine, TorchEngine) and graph is None and 0 <= difference <= 1e-3


def jpeg(rng: np.random.Generator, flip: bool = False) -> bytes:
    image = cv2.GaussianBlur(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8), (9, 9), 3)
    ok, data = cv2.imencode(".png", image[:, ::-1] if flip else image)  # lossless: a flip is exact
    return data.tobytes()


def test_a_logged_model_serves_its_graph_and_flipped_photos_score_alike():
    model, rng = trained_like("cnn"), np.random.default_rng(1)
    scorer = Scorer(model, SPEC, "flip")
    _, graph, _ = checked_engine(scorer, images(), CPU)
    photo = jpeg(rng)
    with mlflow.start_run():
        uri = log_classifier(model, "cnn", SPEC, 0.5, RULE, photo, Calibration("temperature", 1.5), graph,
                             {"tta": "flip"})
    served = mlflow.pyfunc.load_model(uri)
    assert isinstance(served.unwrap_python_model().model.engine, OnnxEngine)
    rows = pd.DataFrame({"image": [base64.b64encode(d).decode() for d in (photo, jpeg(np.random.default_rng(1), True))]})
    probs = served.predict(rows)["malignant_probability"].to_numpy()
    assert probs[0] == pytest.approx(probs[1], abs=1e-6)
    # The same photo through the PyTorch path (a model logged without the graph).
    with mlflow.start_run():
        old = log_classifier(model, "cnn", SPEC, 0.5, RULE, photo, Calibration("temperature", 1.5), None, {"tta": "flip"})
    legacy = mlflow.pyfunc.load_model(old)
    assert isinstance(legacy.unwrap_python_model().model.engine, TorchEngine)
    assert legacy.predict(rows)["malignant_probability"].to_numpy() == pytest.approx(probs, abs=1e-2)  # bf16 on CPUs with it


def test_a_model_logged_before_the_graph_and_views_still_loads(tmp_path):
    weights, settings = tmp_path / "weights.pt", tmp_path / "settings.json"
    torch.save(build_model("cnn", 3).state_dict(), weights)
    settings.write_text(json.dumps({"model": "cnn", "threshold": 0.5, "preprocess": {"img_size": 32, "channels": 3}}))
    classifier = MelanomaClassifier()
    classifier.load(weights, settings)  # no "tta", no "onnx": PyTorch, one view
    assert isinstance(classifier.model.engine, TorchEngine) and classifier.model.engine.scorer.tta == "none"


def test_only_exporter_and_runtime_failures_fall_back_to_pytorch(monkeypatch):
    scorer, batch = Scorer(trained_like("cnn"), SPEC), images()

    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::weird", 17, "")

    monkeypatch.setattr(engines, "export_onnx", unsupported)
    engine, graph, _ = checked_engine(scorer, batch, CPU)
    assert isinstance(engine, TorchEngine) and graph is None

    def bug(*args, **kwargs):
        raise TypeError("a bug in our code")

    monkeypatch.setattr(engines, "export_onnx", bug)
    with pytest.raises(TypeError, match="a bug"):
        checked_engine(scorer, batch, CPU)
