"""The served model: base64 image bytes in, probabilities (and Grad-CAM overlays) out.

An MLflow pyfunc. Clients send a DataFrame column ``image`` of base64-encoded image files
(JPEG, PNG, BMP, ...; any size; grayscale, RGB or RGBA) and get one row per image with
``malignant_probability`` (calibrated on validation), ``benign_probability`` and ``label`` (at
the operating threshold stored with the model). With the predict param ``explain=true`` each row also carries
``gradcam_png``, the Grad-CAM heat map over the sender's photo at its own size (longest side at
most 1024 px) with the part the model saw outlined, and ``gradcam_crop_png``, the heat map over
the model's own input. Images with a side under the model's input size, and requests of more
than ``MAX_ROWS`` rows (``MAX_EXPLAIN_ROWS`` with explanations), are refused with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from melanoma.calibration import Calibration
from melanoma.data.preprocessing import (InvalidImageError, PreprocessSpec, Region, decode_for_model, decode_image,
                                         model_region, preprocess)
from melanoma.data.records import CLASSES
from melanoma.engine import OnnxEngine, TorchEngine, onnx_usable
from melanoma.gradcam import ensemble_gradcam, overlay, overlay_on_photo
from melanoma.inference import TTA_VIEWS, Scorer, select_device, to_model_input
from melanoma.models import build_model, gradcam_layer

SETTINGS_FILE = "settings.json"
WEIGHTS_FILE = "weights.pt"
IMAGE_COLUMN = "image"
# Bounds on one request, so it answers within the scoring server's timeout (a client with more
# images sends several requests; batch scoring goes through `melanoma predict` or Spark).
MAX_ROWS = 500
MAX_EXPLAIN_ROWS = 50
OVERLAY_MAX_SIDE = 1024


class BadInputError(ValueError):
    """A request the model cannot score; the message names the rows and the problem."""


def decode_base64_column(frame: pd.DataFrame) -> list[bytes]:
    """The ``image`` column as raw bytes; every bad row is named in one error."""
    if not isinstance(frame, pd.DataFrame) or IMAGE_COLUMN not in frame.columns:
        columns = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
        raise BadInputError(f"input needs a column {IMAGE_COLUMN!r} of base64-encoded image files; got {columns}")
    if len(frame) == 0:
        raise BadInputError(f"the {IMAGE_COLUMN!r} column is empty: send at least one image")
    if len(frame) > MAX_ROWS:
        raise BadInputError(f"{len(frame):,} rows in one request; send at most {MAX_ROWS} per request")
    out, problems = [], []
    for row, value in enumerate(frame[IMAGE_COLUMN].tolist()):
        if isinstance(value, (bytes, bytearray)):
            out.append(bytes(value))
            continue
        if not isinstance(value, str) or not value.strip():
            problems.append(f"row {row}: empty or not a string")
            continue
        try:
            out.append(base64.b64decode("".join(value.split()), validate=True))  # MIME base64 wraps lines
        except (binascii.Error, ValueError):
            problems.append(f"row {row}: not valid base64")
    if problems:
        raise BadInputError("; ".join(problems))
    return out


def explain_flag(params: dict | None) -> bool:
    """The ``explain`` param as a bool (the server casts it by the signature; direct callers may
    pass "true"/"false")."""
    value = (params or {}).get("explain", False)
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    if not isinstance(value, (bool, np.bool_)):
        raise BadInputError(f"params.explain must be true or false, got {value!r}")
    return bool(value)


def encode_png_base64(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode the overlay as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def network_names(settings: dict) -> list[str]:
    """The architecture of each network a logged model averages (one, or an ensemble's members)."""
    return settings.get("members") or [settings["model"]]


def build_network(settings: dict, channels: int) -> torch.nn.Module:
    """The logged network, untrained: one model, or an ensemble's members as an ``nn.ModuleList``
    (the layout of its weights file)."""
    names = network_names(settings)
    if len(names) == 1:
        return build_model(names[0], channels)
    return torch.nn.ModuleList(build_model(name, channels) for name in names)


class MelanomaClassifier(mlflow.pyfunc.PythonModel):
    """Loads the weights and settings logged with the model; scores base64 image files."""

    def load_context(self, context) -> None:
        onnx = context.artifacts.get("onnx")  # models logged before the ONNX graph have none
        self.load(Path(context.artifacts["weights"]), Path(context.artifacts["settings"]), onnx and Path(onnx))

    def load(self, weights: Path, settings: Path, onnx: Path | None = None) -> None:
        self.settings = json.loads(Path(settings).read_text())
        self.spec = PreprocessSpec(**self.settings["preprocess"])
        self.threshold = float(self.settings["threshold"])  # on the calibrated scale
        self.calibration = Calibration(**self.settings.get("calibration", {}))
        self.device = select_device()
        self.model = build_network(self.settings, self.spec.channels)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.members = list(self.model) if isinstance(self.model, torch.nn.ModuleList) else [self.model]
        self.gradcam_layers = [gradcam_layer(m, self.spec.img_size, self.spec.channels) for m in self.members]
        tta = self.settings.get("tta", "none")
        if onnx is not None and onnx_usable(self.device):
            self.engine = OnnxEngine(str(onnx), views=TTA_VIEWS[tta])
        else:
            self.engine = TorchEngine(Scorer(self.model, self.spec, tta), self.device)

    def preprocess_rows(self, files: list[bytes]) -> tuple[np.ndarray, list[Region]]:
        """Model inputs and the region of each photo they show; all undecodable rows are
        named in one error."""
        arrays, regions, problems = [], [], []
        for row, data in enumerate(files):
            try:
                image = decode_for_model(data, self.spec, refuse_small=True)
            except InvalidImageError as exc:
                problems.append(f"row {row}: {exc}")
                continue
            regions.append(model_region(image, self.spec))
            arrays.append(preprocess(image, self.spec, regions[-1]))
        if problems:
            raise BadInputError("; ".join(problems))
        return np.stack(arrays), regions

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            explain = explain_flag(params)
            files = decode_base64_column(model_input)
            if explain and len(files) > MAX_EXPLAIN_ROWS:
                raise BadInputError(f"{len(files)} rows with explain=true; send at most {MAX_EXPLAIN_ROWS} per request")
            images, regions = self.preprocess_rows(files)
        except BadInputError as exc:
            # INVALID_PARAMETER_VALUE makes the scoring server answer HTTP 400 with this message.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        probs = self.calibration.probabilities(self.engine.logits(images))
        result = pd.DataFrame({
            "malignant_probability": probs.astype(np.float64),
            "benign_probability": (1.0 - probs).astype(np.float64),
            "label": [CLASSES[int(p >= self.threshold)] for p in probs],
        })
        if explain:
            maps = self.gradcam(images)
            result["gradcam_png"] = [encode_png_base64(self.photo_overlay(data, m, region))
                                     for data, m, region in zip(files, maps, regions)]
            result["gradcam_crop_png"] = [encode_png_base64(overlay(np.ascontiguousarray(img.transpose(1, 2, 0)), m))
                                          for img, m in zip(images, maps)]
        return result

    @staticmethod
    def photo_overlay(data: bytes, cam: np.ndarray, region: Region) -> np.ndarray:
        """The heat map over the photo as sent, at its own size (longest side capped)."""
        photo = decode_image(data, reduce_to=OVERLAY_MAX_SIDE)
        return overlay_on_photo(photo, cam, region, OVERLAY_MAX_SIDE)

    def gradcam(self, images: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (N, H, W) in [0, 1] for each image's predicted class (an ensemble's:
        each member's map for that class, averaged)."""
        x = to_model_input(torch.from_numpy(images), self.spec, self.device)
        return ensemble_gradcam(self.members, self.gradcam_layers, x).cpu().numpy()
