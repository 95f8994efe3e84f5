"""A logged model as one library object: network(s), preprocessing, calibration, decision rule,
test-time views and scoring engine.

    model = load_logged_model("models:/melanoma-classifier@champion")
    images, regions = model.images_from_files([jpeg_bytes])
    probs = model.probabilities(images)
    model.labels(probs), model.rule.in_words()

The served pyfunc (``melanoma.classifier.pyfunc``) wraps it; ``ensemble``, ``adapt``,
``evaluate``, the page, ``predict``, ``bench`` and the experiments use it too, so none of them
reads a logged model's files or settings on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from melanoma.classifier.calibration import Calibration
from melanoma.classifier.decision import ThresholdRule, labels_at
from melanoma.classifier.engine import OnnxEngine, TorchEngine, onnx_usable
from melanoma.classifier.gradcam import ensemble_gradcam, overlay_on_photo
from melanoma.classifier.inference import TTA_VIEWS, Scorer, select_device, to_model_input
from melanoma.classifier.models import build_model, gradcam_layer
from melanoma.classifier.preprocessing import (
    InvalidImageError,
    PreprocessSpec,
    Region,
    decode_for_model,
    decode_image,
    model_region,
    preprocess,
)
from melanoma.classifier.scope import ScopeModel

SETTINGS_FILE = "settings.json"
WEIGHTS_FILE = "weights.pt"
OVERLAY_MAX_SIDE = 1024


class UnreadableImagesError(ValueError):
    """Files a model cannot score; ``problems`` maps each file's position to what is wrong."""

    def __init__(self, problems: dict[int, str]):
        self.problems = problems
        super().__init__("; ".join(f"row {row}: {problem}" for row, problem in problems.items()))


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


class LoggedModel:
    """A logged model, loaded: what it computes and how it decides."""

    def __init__(self, settings: dict, network: torch.nn.Module, onnx_graph: Path | None = None,
                 device: torch.device | None = None, scope: ScopeModel | None = None):
        self.settings = settings
        self.spec = PreprocessSpec.from_dict(settings["preprocess"])
        self.threshold = float(settings["threshold"])  # on the calibrated scale
        self.rule = ThresholdRule.from_record(settings)
        self.calibration = Calibration(**settings.get("calibration", {}))
        self.tta = settings.get("tta", "none")
        self.names = network_names(settings)
        self.onnx_graph = onnx_graph  # models logged before the ONNX graph have none
        self.scope = scope  # models logged before the in-scope check (and ensembles) have none
        self.device = device or select_device()
        self.network = network.to(self.device).to(memory_format=torch.channels_last).eval()
        self.members = list(network) if isinstance(network, torch.nn.ModuleList) else [network]
        self._gradcam_layers = [gradcam_layer(m, self.spec.img_size, self.spec.channels) for m in self.members]
        use_onnx = onnx_graph is not None and onnx_usable(self.device)
        self.engine = OnnxEngine(str(onnx_graph), views=TTA_VIEWS[self.tta]) if use_onnx else self.torch_engine()

    @classmethod
    def from_files(cls, weights: Path, settings: Path, onnx_graph: Path | None = None,
                   device: torch.device | None = None, scope: Path | None = None) -> LoggedModel:
        """The model from its logged artifacts (the pyfunc's ``weights``, ``settings``, ``onnx``
        and ``scope``)."""
        values = json.loads(Path(settings).read_text())
        network = build_network(values, PreprocessSpec.from_dict(values["preprocess"]).channels)
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        scope_model = ScopeModel.from_state(torch.load(scope, weights_only=True)) if scope else None
        return cls(values, network, onnx_graph and Path(onnx_graph), device, scope_model)

    def scorer(self, tta: str | None = None, scope: bool = True) -> Scorer:
        """What the model computes (uint8 images in, logits and scope scores out), with its own or
        other views; ``scope=False``: logits alone."""
        return Scorer(self.network, self.spec, self.tta if tta is None else tta, self.scope if scope else None)

    def torch_engine(self, tta: str | None = None) -> TorchEngine:
        return TorchEngine(self.scorer(tta), self.device)

    def images_from_files(self, files: list[bytes]) -> tuple[np.ndarray, list[Region]]:
        """Model inputs (N, C, H, W) of image files and the region of each photo they show; every
        file it cannot score is named in one ``UnreadableImagesError``."""
        arrays, regions, problems = [], [], {}
        for row, data in enumerate(files):
            try:
                image = decode_for_model(data, self.spec, refuse_small=True)
            except InvalidImageError as exc:
                problems[row] = str(exc)
                continue
            regions.append(model_region(image, self.spec))
            arrays.append(preprocess(image, self.spec, regions[-1]))
        if problems:
            raise UnreadableImagesError(problems)
        return np.stack(arrays), regions

    def logits(self, images: np.ndarray) -> torch.Tensor:
        return self.engine.logits(images)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated malignant probabilities of model inputs."""
        return self.calibration.probabilities(self.logits(images))

    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated malignant probabilities and scope scores (None without a scope model), from
        one pass."""
        logits, scores = self.engine.outputs(images)
        return self.calibration.probabilities(logits), (None if scores is None else scores.numpy())

    def in_scope(self, scores: np.ndarray) -> np.ndarray:
        """Whether each scope score is within the model's threshold."""
        return np.asarray(scores) <= self.scope.threshold

    def labels(self, probabilities: np.ndarray) -> list[str]:
        """The served label of each probability, at the model's threshold."""
        return labels_at(probabilities, self.threshold)

    def gradcam(self, images: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (N, H, W) in [0, 1] for each image's predicted class (an ensemble's:
        each member's map for that class, averaged)."""
        x = to_model_input(torch.from_numpy(images), self.spec, self.device)
        return ensemble_gradcam(self.members, self._gradcam_layers, x).cpu().numpy()

    @staticmethod
    def photo_overlay(data: bytes, cam: np.ndarray, region: Region) -> np.ndarray:
        """The heat map over the photo as sent, at its own size (longest side capped)."""
        photo = decode_image(data, reduce_to=OVERLAY_MAX_SIDE)
        return overlay_on_photo(photo, cam, region, OVERLAY_MAX_SIDE)


def load_logged_model(model_uri: str) -> LoggedModel:
    """The logged model at ``model_uri`` (``runs:/``, ``models:/``, a path), loaded in this process."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model
