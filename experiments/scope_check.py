"""The in-scope check measured: which score, and what it catches at 99 % of validation in scope.

    pip install scikit-image   # its bundled everyday photos
    python -m experiments.scope_check --runs CROSSVAL_ID --out-of-scope ../shared/data/out_of_scope_dev \
        --out docs/scope_check_cpu.json

For each child of a finished cross-source validation (a model trained without one source), the
scope model is fitted as training fits it (``fit_scope_model``: training photos' stage
statistics, threshold at 99 % of the validation photos) and, beside it, the same distance on the
penultimate features, and the max-logit and energy scores (thresholded the same way). Each score is judged on: the validation photos, the source
the child never saw (a new clinic's dermoscopy: should stay in scope), non-dermoscopic skin
photos (clinical and total-body), everyday photos (scikit-image's samples) and generated
pictures (``melanoma.data.out_of_scope``). Then the served graph's latency with and without the
check, interleaved, one image at a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import torch

from experiments.heldout import children
from melanoma.classifier.engine import OnnxEngine, export_onnx
from melanoma.classifier.inference import Scorer, scope_features, select_device
from melanoma.classifier.logged import load_logged_model
from melanoma.classifier.preprocessing import InvalidImageError, decode_for_model, preprocess
from melanoma.classifier.scope import IN_SCOPE_SHARE, colourfulness, fit_scope, logits_and_features, threshold_for_share
from melanoma.config import parse_params
from melanoma.data.out_of_scope import generated_pictures
from melanoma.data.training_data import load_data
from melanoma.workflows.training import fit_scope_model

log = logging.getLogger(__name__)


def everyday_photos() -> list[np.ndarray]:
    """scikit-image's bundled sample photos (RGB), the ones that ship with the package."""
    import skimage.data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "horse", "hubble_deep_field",
                 "coins", "camera", "page", "text", "brick", "grass", "gravel", "moon", "retina", "immunohistochemistry",
                 "cell", "colorwheel", "logo", "chessboard", "clock", "phantom", "microaneurysms"):
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # a sample that needs a download: not here
            log.info("skipping %s: %s", name, exc)
            continue
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = image[:, :, :3]
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(1, image.max()))).astype(np.uint8)
        photos.append(image)
    return photos


def folder_inputs(folder: Path, spec) -> dict[str, np.ndarray]:
    """The out-of-scope folder's photos as model inputs, by kind (``image_type`` in images.csv)."""
    by_kind: dict[str, list[np.ndarray]] = {}
    with (folder / "images.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                image = decode_for_model((folder / row["file"]).read_bytes(), spec)
            except InvalidImageError:
                continue
            by_kind.setdefault(row["image_type"], []).append(preprocess(image, spec))
    return {kind: np.stack(arrays) for kind, arrays in by_kind.items()}


@torch.inference_mode()
def penultimate(network, spec, images: np.ndarray, device) -> np.ndarray:
    """What the classifier head reads (the candidate the stage statistics replaced)."""
    from melanoma.classifier.models import classifier_head
    from melanoma.classifier.preprocessing import normalization, normalize

    mean, std = normalization(spec, device)
    out = []
    for start in range(0, len(images), 128):
        caught = []
        handle = classifier_head(network).register_forward_pre_hook(lambda m, i: caught.append(i[0].flatten(1)))
        network(normalize(torch.as_tensor(np.array(images[start:start + 128])).to(device), mean, std))
        handle.remove()
        out.append(caught[0].float().cpu())
    return torch.cat(out).numpy()


@torch.inference_mode()
def scores(network, spec, scope, head_scope, images: np.ndarray, device) -> dict[str, np.ndarray]:
    """Every candidate score of uint8 model inputs (larger: further out of scope)."""
    features = scope_features(network, images, spec, device)
    logits = classifier_logits(network, spec, images, device)
    return {"stage_statistics": scope(torch.from_numpy(features), colourfulness(torch.from_numpy(np.asarray(images))))
            .numpy(),
            "penultimate": head_scope(torch.from_numpy(penultimate(network, spec, images, device))).numpy(),
            "max_logit": -logits.max(1).values.numpy(),
            "energy": -torch.logsumexp(logits, 1).numpy()}


def classifier_logits(network, spec, images, device) -> torch.Tensor:
    from melanoma.classifier.preprocessing import normalization, normalize

    mean, std = normalization(spec, device)
    out = []
    for start in range(0, len(images), 128):
        x = normalize(torch.as_tensor(np.array(images[start:start + 128])).to(device), mean, std)
        out.append(logits_and_features(network, x)[0].float().cpu())
    return torch.cat(out)


def latency(network, spec, scope, photo: np.ndarray, rounds: int = 5, repeats: int = 50) -> dict[str, float]:
    """p50 of one image through the exported graph, without and with the check, interleaved."""
    engines = {name: OnnxEngine(export_onnx(Scorer(network, spec, "none", s), spec.channels, spec.img_size))
               for name, s in (("without", None), ("with", scope))}
    samples = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            engine.outputs(photo)
            for _ in range(repeats):
                start = time.perf_counter()
                engine.outputs(photo)
                samples[name].append(time.perf_counter() - start)
    return {f"latency_p50_ms_{name}": 1000 * float(np.median(v)) for name, v in samples.items()}


def scope_arguments(description: str) -> tuple[argparse.Namespace, list[dict]]:
    """The command line of the scope experiments, and the rows an earlier run left in ``--out``
    (a stopped experiment resumes where it stopped)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", nargs="+", required=True, help="crossval run ids")
    parser.add_argument("--out-of-scope", type=Path, required=True)
    parser.add_argument("--sources", default="", help="only these held-out sources (comma-separated)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args, json.loads(args.out.read_text())["rows"] if args.out.exists() else []


def children_to_measure(args: argparse.Namespace, rows: list[dict], device: torch.device) -> Iterator[tuple]:
    """Each child asked for and not yet in ``rows``: its held-out source, run id, network (in
    eval mode on ``device``), preprocessing spec, settings and data."""
    for run_id in args.runs:
        for source, child in sorted(children(run_id).items()):
            if (args.sources and source not in args.sources.split(",")) or any(r["source"] == source for r in rows):
                continue
            model = load_logged_model(f"runs:/{child}/model")
            cfg = parse_params(mlflow.MlflowClient().get_run(child).data.params)
            yield source, child, model.network.to(device).eval(), model.spec, cfg, load_data(cfg, model.spec)


def main() -> None:
    args, rows = scope_arguments(__doc__.splitlines()[0])
    device = select_device()
    for source, child, network, spec, cfg, data in children_to_measure(args, rows, device):
        d = data.data
        scope = fit_scope_model(network, spec, d, data, device, cfg.seed)
        fit_photos = np.sort(np.random.default_rng(cfg.seed).permutation(data.fit_idx)[:5000])
        head_scope = fit_scope(penultimate(network, spec, np.asarray(d.images[fit_photos]), device))
        sets = {"validation": np.asarray(d.images[data.val_idx]),
                f"held-out source ({source})": np.asarray(d.images[data.holdout_idx])}
        out_of_scope = {f"skin photo, {k}": v for k, v in folder_inputs(args.out_of_scope, spec).items()}
        everyday = everyday_photos()
        out_of_scope["everyday photo"] = np.stack([preprocess(p, spec) for p in everyday])
        photos = [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in np.asarray(d.images[data.val_idx[:16]])]
        for kind, pictures in generated_pictures(np.random.default_rng(0), photos, per_kind=16).items():
            out_of_scope[f"generated, {kind}"] = np.stack([preprocess(p, spec) for p in pictures])
        val_scores = scores(network, spec, scope, head_scope, sets["validation"], device)
        thresholds = {name: threshold_for_share(v, IN_SCOPE_SHARE) for name, v in val_scores.items()}
        row = {"source": source, "child_run": child, "fitted_on": int(min(len(data.fit_idx), 5000)),
               "threshold": thresholds}
        for name, images in {**sets, **out_of_scope}.items():
            s = scores(network, spec, scope, head_scope, images, device)
            row[name] = {"photos": int(len(images)),
                         **{score: float(np.mean(s[score] <= thresholds[score])) for score in s}}
        row.update(latency(network.cpu(), spec, scope, np.asarray(d.images[data.val_idx[:1]])))
        rows.append(row)
        log.info("%s", json.dumps(row)[:2000])
        args.out.write_text(json.dumps({"in_scope_share": IN_SCOPE_SHARE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
