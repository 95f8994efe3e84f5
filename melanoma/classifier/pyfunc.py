"""The served model: base64 image bytes in, probabilities (and Grad-CAM overlays) out.

An MLflow pyfunc. Clients send a DataFrame column ``image`` of base64-encoded image files
(JPEG, PNG, BMP, ...; any size; grayscale, RGB or RGBA) and get one row per image with
``malignant_probability`` (calibrated on validation), ``benign_probability`` and ``label`` (at
the operating threshold stored with the model). With the predict param ``explain=true`` each row also carries
``gradcam_png``, the Grad-CAM heat map over the sender's photo at its own size (longest side at
most 1024 px) with the part the model saw outlined, and ``gradcam_crop_png``, the heat map over
the model's own input. Images with a side under the model's input size, and requests of more
than ``MAX_ROWS`` rows (``MAX_EXPLAIN_ROWS`` with explanations), are refused with HTTP 400.

The in-scope check: ``scope_check`` is ``in scope``, ``out of scope`` (not a dermoscopy photo
like the model's training photos: its figures do not hold for it) or ``absent`` (a model logged
without the check, or an ensemble); ``in_scope`` and ``scope_score`` carry it where it ran. An
out-of-scope photo keeps its probability, and its label is ``out of scope`` unless the request
(param ``label_out_of_scope=true``) or the whole deployment (``MELANOMA_LABEL_OUT_OF_SCOPE=true``
in the server's environment) asks for the class label all the same.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from melanoma.classifier.gradcam import overlay
from melanoma.classifier.logged import LoggedModel, UnreadableImagesError

IMAGE_COLUMN = "image"
IN_SCOPE, OUT_OF_SCOPE, SCOPE_ABSENT = "in scope", "out of scope", "absent"
LABEL_OUT_OF_SCOPE_ENV = "MELANOMA_LABEL_OUT_OF_SCOPE"
# Bounds on one request, so it answers within the scoring server's timeout (a client with more
# images sends several requests; batch scoring goes through `melanoma predict` or Spark).
MAX_ROWS = 500
MAX_EXPLAIN_ROWS = 50


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


def file_problem(exc: MlflowException) -> str:
    """What is wrong with the one file of a refused one-row request (the whole message for any
    other refusal)."""
    cause = exc.__cause__
    if isinstance(cause, UnreadableImagesError) and len(cause.problems) == 1:
        return next(iter(cause.problems.values()))
    return exc.message


def bool_param(params: dict | None, name: str, default: bool = False) -> bool:
    """A boolean predict param (the server casts it by the signature; direct callers may pass
    "true"/"false")."""
    value = (params or {}).get(name, default)
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    if not isinstance(value, (bool, np.bool_)):
        raise BadInputError(f"params.{name} must be true or false, got {value!r}")
    return bool(value)


def label_out_of_scope_by_default() -> bool:
    """The deployment's choice (``MELANOMA_LABEL_OUT_OF_SCOPE``): label out-of-scope photos anyway,
    whatever the request says."""
    return os.environ.get(LABEL_OUT_OF_SCOPE_ENV, "false").strip().lower() == "true"


def scope_columns(model: LoggedModel, probs: np.ndarray, scores: np.ndarray | None,
                  label_out_of_scope: bool) -> dict[str, list]:
    """``label``, ``in_scope``, ``scope_score`` and ``scope_check`` of each row."""
    labels = model.labels(probs)
    if scores is None:
        return {"label": labels, "in_scope": [None] * len(labels), "scope_score": [float("nan")] * len(labels),
                "scope_check": [SCOPE_ABSENT] * len(labels)}
    inside = model.in_scope(scores)
    return {"label": [label if ok or label_out_of_scope else OUT_OF_SCOPE for label, ok in zip(labels, inside)],
            "in_scope": [bool(ok) for ok in inside], "scope_score": scores.astype(np.float64).tolist(),
            "scope_check": [IN_SCOPE if ok else OUT_OF_SCOPE for ok in inside]}


def encode_png_base64(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode the overlay as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


class MelanomaClassifier(mlflow.pyfunc.PythonModel):
    """The served pyfunc: a ``LoggedModel`` behind the request format (base64 files in, one row
    per image out)."""

    def load_context(self, context) -> None:
        onnx = context.artifacts.get("onnx")  # models logged before the ONNX graph have none
        scope = context.artifacts.get("scope")  # nor those before the in-scope check, nor ensembles
        self.load(Path(context.artifacts["weights"]), Path(context.artifacts["settings"]), onnx and Path(onnx),
                  scope and Path(scope))

    def load(self, weights: Path, settings: Path, onnx: Path | None = None, scope: Path | None = None) -> None:
        self.model = LoggedModel.from_files(weights, settings, onnx, scope=scope)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            explain = bool_param(params, "explain")
            label_out_of_scope = bool_param(params, "label_out_of_scope") or label_out_of_scope_by_default()
            files = decode_base64_column(model_input)
            if explain and len(files) > MAX_EXPLAIN_ROWS:
                raise BadInputError(f"{len(files)} rows with explain=true; send at most {MAX_EXPLAIN_ROWS} per request")
            images, regions = self.model.images_from_files(files)
        except (BadInputError, UnreadableImagesError) as exc:
            # INVALID_PARAMETER_VALUE makes the scoring server answer HTTP 400 with this message.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        probs, scores = self.model.assess(images)
        result = pd.DataFrame({
            "malignant_probability": probs.astype(np.float64),
            "benign_probability": (1.0 - probs).astype(np.float64),
            **scope_columns(self.model, probs, scores, label_out_of_scope),
        })
        if explain:
            maps = self.model.gradcam(images)
            result["gradcam_png"] = [encode_png_base64(self.model.photo_overlay(data, m, region))
                                     for data, m, region in zip(files, maps, regions)]
            result["gradcam_crop_png"] = [encode_png_base64(overlay(np.ascontiguousarray(img.transpose(1, 2, 0)), m))
                                          for img, m in zip(images, maps)]
        return result
