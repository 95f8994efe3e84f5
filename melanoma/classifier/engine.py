"""Scoring engines: ONNX Runtime on the exported graph, or PyTorch.

Every logged model carries ``model.onnx``: its ``Scorer`` (normalisation, test-time views,
ensemble members) exported when the model is logged and checked there against PyTorch in fp32
on real images. On a CPU ONNX Runtime runs it several times faster than PyTorch eager, whose
per-module overhead dominates for one small image (docs/performance.md). A run's final figures,
the served model, ``melanoma predict``, the page and Spark all score through the same engine.
Models logged before the graph existed are scored by PyTorch; Grad-CAM always is (it needs
gradients), and so is everything on a GPU where ONNX Runtime has no CUDA provider.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings

import numpy as np
import torch
from torch.onnx.errors import OnnxExporterError

from melanoma.classifier.inference import TTA_VIEWS, Scorer, predict_outputs

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPSET = 17
# Largest malignant-probability difference allowed between the graph and PyTorch (fp32).
TOLERANCE = 1e-4
BATCH_IMAGES = 64  # images per engine call (their views count): bounds the activations' memory


class TorchEngine:
    """A ``Scorer`` run by PyTorch (mixed precision where it pays, as in training)."""

    name = "torch"

    def __init__(self, scorer: Scorer, device: torch.device):
        self.scorer, self.device = scorer.to(device).eval(), device

    def outputs(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (N, 2) of uint8 images (N, C, H, W), and their scope scores (None without)."""
        return predict_outputs(self.scorer, images, None, self.device, batch_size=BATCH_IMAGES)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        return self.outputs(images)[0]


class OnnxEngine:
    """The exported ``Scorer`` run by ONNX Runtime, with as many threads as torch would use."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str, views: int = 1, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.batch = max(1, BATCH_IMAGES // views)

    def outputs(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (N, 2) of uint8 images (N, C, H, W), and their scope scores (None without)."""
        out = [self.session.run(None, {"images": np.ascontiguousarray(images[start:start + self.batch])})
               for start in range(0, len(images), self.batch)]
        if not out:
            return torch.empty(0, 2), None
        logits = torch.from_numpy(np.concatenate([o[0] for o in out]))
        return logits, (torch.from_numpy(np.concatenate([o[1] for o in out])) if len(out[0]) > 1 else None)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        return self.outputs(images)[0]


def onnx_usable(device: torch.device) -> bool:
    """ONNX Runtime scores on the CPU, and on a GPU where it has the CUDA provider."""
    if device.type == "cpu":
        return True
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def cpu_copy(scorer: Scorer) -> Scorer:
    """The scorer in fp32 on the CPU, leaving the caller's network where it is (on a GPU, say)."""
    return copy.deepcopy(scorer).cpu().float().eval()


def export_onnx(scorer: Scorer, channels: int, img_size: int) -> bytes:
    """The scorer as an ONNX graph: uint8 ``images`` (batch, C, H, W) in, ``logits`` (batch, 2) out,
    and ``scope`` (batch,) where the scorer has a scope model."""
    scorer = cpu_copy(scorer)
    example = torch.zeros(2, channels, img_size, img_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        # The TorchScript exporter: 1 s for EfficientNet-Lite0 against 9 s for the dynamo one
        # (measured here), the same graph for this network.
        outputs = ["logits"] + (["scope"] if scorer.scope is not None else [])
        torch.onnx.export(scorer, (example,), buffer, dynamo=False, input_names=["images"], output_names=outputs,
                          dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                          opset_version=OPSET)
    return buffer.getvalue()


def probability_difference(scorer: Scorer, engine: OnnxEngine, images: np.ndarray) -> float:
    """The largest difference between ``engine`` and the scorer in fp32: in malignant probability,
    and (with a scope model) in scope score relative to its size."""
    reference_scorer = cpu_copy(scorer)
    with torch.inference_mode():
        batches = [reference_scorer(torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH_IMAGES])))
                   for start in range(0, len(images), BATCH_IMAGES)]
    scoped = scorer.scope is not None
    reference = torch.cat([b[0] if scoped else b for b in batches])
    logits, scores = engine.outputs(images)
    difference = float((torch.softmax(logits.float(), 1)[:, 1] - torch.softmax(reference, 1)[:, 1]).abs().max())
    if scoped:
        expected = torch.cat([b[1] for b in batches])
        difference = max(difference, float(((scores - expected).abs() / expected.abs().clamp_min(1.0)).max()))
    return difference


def runtime_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a graph it cannot load or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return tuple(getattr(ort_state, name) for name in ("Fail", "InvalidArgument", "InvalidGraph", "NotImplemented",
                                                        "RuntimeException", "EPFail", "InvalidProtobuf"))


# The TorchScript exporter reports an operator it cannot export as OnnxExporterError, a trace it
# cannot take as RuntimeError; anything else (a TypeError, say) is a bug and propagates.
EXPORT_ERRORS = (OnnxExporterError, RuntimeError)


def checked_engine(scorer: Scorer, images: np.ndarray, device: torch.device) -> tuple[object, bytes | None, float]:
    """The engine to score with, the ONNX graph if it passed its check, and the difference
    measured on ``images`` (real model inputs); PyTorch where the graph cannot be exported,
    differs by more than ``TOLERANCE``, or cannot run on ``device``."""
    spec_channels, side = images.shape[1], images.shape[-1]
    try:
        graph = export_onnx(scorer, spec_channels, side)
    except EXPORT_ERRORS as exc:
        log.warning("the ONNX export failed (%s): scoring with PyTorch", exc)
        return TorchEngine(scorer, device), None, float("nan")
    try:
        engine = OnnxEngine(graph, views=TTA_VIEWS[scorer.tta])
        difference = probability_difference(scorer, engine, images)
    except runtime_errors() as exc:
        log.warning("ONNX Runtime cannot run the exported graph (%s): scoring with PyTorch", exc)
        return TorchEngine(scorer, device), None, float("nan")
    if difference > TOLERANCE:
        log.warning("the ONNX graph differs from PyTorch by %.2g in probability (over %g): scoring with PyTorch",
                    difference, TOLERANCE)
        return TorchEngine(scorer, device), None, difference
    return (engine if onnx_usable(device) else TorchEngine(scorer, device)), graph, difference
