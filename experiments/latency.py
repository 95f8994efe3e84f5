"""What the in-scope check and the fold models cost a served image: one image at a time through
the exported graph of a model without its check, with it (the distance and the colour limit),
and of k copies of the model averaged (what ``adapt --finetune`` serves with
``site_model=folds``), interleaved. With ``--photo``, also a whole served request without and
with the check: the served model's ``predict`` on one base64 JPEG (decoding, lesion crop, graph,
answer columns), as ``mlflow models serve`` runs it less the HTTP.

    python -m experiments.latency --model runs:/CHILD/model --folds 5 --photo PHOTO.jpg --out docs/latency_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from melanoma.classifier.engine import OnnxEngine, export_onnx
from melanoma.classifier.inference import Scorer
from melanoma.classifier.logged import LoggedModel, load_logged_model
from melanoma.classifier.pyfunc import MelanomaClassifier
from melanoma.classifier.scope import ScopeModel


def p50_ms(calls: dict[str, Callable[[], object]], rounds: int = 5, repeats: int = 50) -> dict[str, float]:
    """The median milliseconds of each call, the calls interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()  # warm
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(v)) for name, v in samples.items()}


def served(model: LoggedModel, scorer: Scorer, folder: Path) -> MelanomaClassifier:
    """The served pyfunc of ``model`` with the exported graph of ``scorer`` (its check or none)."""
    graph = folder / f"{len(list(folder.iterdir()))}.onnx"
    graph.write_bytes(export_onnx(scorer, model.spec.channels, model.spec.img_size))
    classifier = MelanomaClassifier()
    classifier.model = LoggedModel(model.settings, model.network, graph, torch.device("cpu"), scorer.scope)
    return classifier


def fold_models(network: torch.nn.Module, folds: int) -> torch.nn.ModuleList:
    """``folds`` copies of ``network``, each nudged so that no two share weights (identical
    members would be merged by the graph optimiser and cost nothing)."""
    copies = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(folds):
        member = copy.deepcopy(network)
        with torch.no_grad():
            for p in member.parameters():
                p.add_(1e-4 * torch.randn(p.shape, generator=generator))
        copies.append(member)
    return torch.nn.ModuleList(copies).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--photo", type=Path, help="a dermoscopy JPEG: also time whole served requests")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = load_logged_model(args.model)
    network, spec = model.network.cpu().eval(), model.spec
    if model.scope is None:
        raise SystemExit(f"{args.model} has no in-scope check to time")
    image = np.random.default_rng(0).integers(0, 256, (1, spec.channels, spec.img_size, spec.img_size), np.uint8)
    plain = ScopeModel.from_state({k: v for k, v in model.scope.state().items() if k != "colour_limit"})
    coloured = plain.with_colour_limit(np.array([0.1]))
    scorers = {"one model, no check": Scorer(network, spec), "with the distance": Scorer(network, spec, "none", plain),
               "with the distance and the colour limit": Scorer(network, spec, "none", coloured),
               f"{args.folds} fold models": Scorer(fold_models(network, args.folds), spec)}
    engines = {name: OnnxEngine(export_onnx(scorer, spec.channels, spec.img_size)) for name, scorer in scorers.items()}
    result = {"model": args.model, "architecture": model.names[0], "img_size": spec.img_size,
              "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "p50_ms": p50_ms({name: partial(engine.outputs, image) for name, engine in engines.items()})}
    if args.photo:
        request = pd.DataFrame({"image": [base64.b64encode(args.photo.read_bytes()).decode()]})
        with tempfile.TemporaryDirectory() as folder:
            classifiers = {name: served(model, scorers[name], Path(folder))
                           for name in ("one model, no check", "with the distance and the colour limit")}
            result["served_request_p50_ms"] = p50_ms(
                {name: partial(c.predict, None, request) for name, c in classifiers.items()})
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
