"""``melanoma bench``: how fast each stage runs on this machine, in one process.

Measures data preparation (cold decode vs cache), training throughput of the notebook's loop
and of ours at the notebook's settings and at the default ones, achieved FLOP rates against the
machine's matrix-multiply rate, prediction latency of the logged pyfunc model in-process and
over HTTP, and (``--tricks``) each speed trick against plain PyTorch, interleaved.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from melanoma import tracking
from melanoma.classifier.architectures import ARCHITECTURES
from melanoma.classifier.decision import ThresholdRule
from melanoma.classifier.engine import OnnxEngine, TorchEngine, checked_engine
from melanoma.classifier.inference import TTA_VIEWS, Scorer, select_device
from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec, decode_for_model, preprocess
from melanoma.config import TrainConfig
from melanoma.data.dataset import cache_dir, prepare_dataset
from melanoma.data.demo import demo_dataset
from melanoma.data.layout import discover
from melanoma.data.records import Source
from melanoma.memory import glibc_mallopt, recycle_freed_memory
from melanoma.servers import model_server, post_images
from melanoma.train import grad_scaler, make_batch, sample_weights, train_step, weighted_mean

log = logging.getLogger(__name__)

# The notebook's training settings, at which both training loops are compared.
NOTEBOOK = {"img_size": 224, "channels": 1, "batch_size": 16, "lr": 1e-3}
DEFAULT = TrainConfig()
# (model, image size, channels, batch size) of the two configurations speed tricks must pay in.
CONFIGURATIONS = {"notebook": ("cnn", NOTEBOOK["img_size"], NOTEBOOK["channels"], NOTEBOOK["batch_size"]),
                  "default": (DEFAULT.model, DEFAULT.img_size, DEFAULT.channels, DEFAULT.batch_size)}
WARMUP_STEPS = 3


# --- the notebook's loop, re-created faithfully -------------------------------------------------

class NotebookDataset(Dataset):
    """As in the notebook: a numpy array per sample, to PIL, torchvision transforms per sample,
    one-hot float labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.RandomRotation(20),
                                             transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.transform(Image.fromarray(self.images[i][0]))
        return image, F.one_hot(torch.tensor(self.labels[i]), 2).float()


def notebook_cnn() -> nn.Module:
    """The notebook's CNN in its own layer order (ReLU before max-pool), NCHW, fp32."""
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 2))


def time_notebook_training(images: np.ndarray, labels: np.ndarray, steps: int) -> tuple[float, float]:
    """(images per second, FLOPs per image) of the notebook's loop over ``steps`` batches after warm-up."""
    torch.manual_seed(0)
    model = notebook_cnn().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=NOTEBOOK["lr"])
    loader = DataLoader(NotebookDataset(images, labels), batch_size=NOTEBOOK["batch_size"], shuffle=True)
    batches = iter(loader)
    seen, start = 0, 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            seen, start = 0, time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        with FlopCounterMode(display=False) if step == 0 else contextlib.nullcontext() as counter:
            loss = nn.CrossEntropyLoss()(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step == 0:
            flops_per_image = counter.get_total_flops() / len(x)
        seen += len(x)
    return seen / (time.perf_counter() - start), flops_per_image


# --- this project's loop ----------------------------------------------------------------------

def time_training(model_name: str, images: np.ndarray, labels: np.ndarray, spec: PreprocessSpec, batch: int,
                  steps: int, device: torch.device, recycle: bool = True,
                  channels_last: bool = True) -> tuple[float, float]:
    """(images per second, FLOPs per image) of our training step. ``recycle`` and
    ``channels_last`` switch the two speed tricks of the training path off, for comparison."""
    torch.manual_seed(0)
    model = build_model(model_name, spec.channels).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=NOTEBOOK["lr"])
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    weights = sample_weights(labels)
    generator = torch.Generator().manual_seed(0)
    scaler = grad_scaler(device)

    def step() -> None:
        idx = torch.randint(len(images_t), (batch,), generator=generator)
        x, y = make_batch(images_t[idx], labels_t[idx], spec, "full", generator, device)
        train_step(model, optimizer, scaler, x if channels_last else x.contiguous(), y,
                   weighted_mean(weights[idx].to(device)), device)

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_image = counter.get_total_flops() / batch
    with recycle_freed_memory(recycle):
        for _ in range(WARMUP_STEPS - 1):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds = time.perf_counter() - start
    return batch * steps / seconds, flops_per_image


def time_tricks(images: np.ndarray, labels: np.ndarray, steps: int, device: torch.device,
                rounds: int = 3, configurations: dict = CONFIGURATIONS) -> dict:
    """Each speed trick of the training path against plain PyTorch, in each configuration,
    interleaved (trick on, off, on, off, ...) so the machine's drift hits both alike."""
    results = {}
    for config, (model_name, size, channels, batch) in configurations.items():
        spec = PreprocessSpec(img_size=size, channels=channels, color_constancy=False, crop_lesion=False)
        resized = resize_batch(images, size, channels)
        for trick in ("recycle", "channels_last"):
            on, off = [], []
            for _ in range(rounds):
                on.append(time_training(model_name, resized, labels, spec, batch, steps, device)[0])
                off.append(time_training(model_name, resized, labels, spec, batch, steps, device,
                                         **{trick: False})[0])
            results[f"trick_{trick}_{config}_img_per_s_on"] = float(np.median(on))
            results[f"trick_{trick}_{config}_img_per_s_off"] = float(np.median(off))
            results[f"trick_{trick}_{config}_speedup"] = float(np.median(on) / np.median(off))
    return results


def resize_batch(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) images at another size and channel count (for timing only)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 2, rounds: int = 5) -> float:
    """The machine's fp32 matrix-multiply rate: the best of a few rounds, as a ceiling."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


# --- data preparation -------------------------------------------------------------------------

@contextlib.contextmanager
def empty_cache() -> Iterator[None]:
    """$MELANOMA_CACHE points at a new, empty folder within the block."""
    previous = os.environ.get("MELANOMA_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MELANOMA_CACHE"] = tmp
        try:
            yield
        finally:
            if previous is None:
                del os.environ["MELANOMA_CACHE"]
            else:
                os.environ["MELANOMA_CACHE"] = previous


def time_preparation(location: Path, spec: PreprocessSpec) -> dict:
    """Cold preparation (decode + resize) into an empty cache, then a reload from the cache."""
    with empty_cache():
        start = time.perf_counter()
        cold = prepare_dataset(location, spec)
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = prepare_dataset(location, spec)
        cached_s = time.perf_counter() - start
        in_memory = np.array(warm.images)  # what a first epoch pays on top: reading every page
        materialized_s = time.perf_counter() - start
    n = len(cold.labels)
    assert len(in_memory) == n
    return {"images": n, "decode_img_per_s": n / decode_s, "cached_img_per_s": n / cached_s,
            "cached_materialized_img_per_s": n / materialized_s, "cache_speedup": decode_s / cached_s,
            "_data": cold}


# --- serving ----------------------------------------------------------------------------------

# The server as serve/README.md starts it on a CPU: one intra-op thread, since one image per
# request gains nothing from more and the scoring server's worker threads would each bring
# their own OpenMP team (ResNet-18 at 64 px: p50 30.7-35.2 ms with the default, 23.6-29.6 ms).
SERVE_ENV = {"OMP_NUM_THREADS": "1"}


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_engines(pyfunc, encoded: list[str], requests: int, rounds: int) -> dict:
    """The engines a logged model can score with here, interleaved round by round: PyTorch on the
    model's device and ONNX Runtime (on the GPU where it has the CUDA provider, else the CPU),
    each alone on one model input and on 32 (``engine_*``), and the whole pyfunc call on base64
    JPEGs (``predict_*``: decoding and preprocessing included). ``served_engine`` names the one
    the served model uses on this machine."""
    model = pyfunc.unwrap_python_model().model
    served = model.engine
    engines = {"torch": served if isinstance(served, TorchEngine) else model.torch_engine()}
    if model.onnx_graph is not None:
        engines["onnxruntime"] = (served if isinstance(served, OnnxEngine)
                                  else OnnxEngine(str(model.onnx_graph), views=TTA_VIEWS[model.tta]))
    one, batch = pd.DataFrame({"image": encoded[:1]}), pd.DataFrame({"image": (encoded * 32)[:32]})
    inputs = model.images_from_files([base64.b64decode(e) for e in (encoded * 32)[:32]])[0]
    samples: dict[str, list[float]] = {}
    per_round = max(1, requests // rounds)
    try:
        for _ in range(rounds):
            for name, engine in engines.items():
                model.engine = engine
                for key, call, repeats in (("engine_one_ms", lambda: engine.logits(inputs[:1]), per_round),
                                           ("engine_batch32_s", lambda: engine.logits(inputs), max(1, per_round // 10)),
                                           ("predict_one_ms", lambda: pyfunc.predict(one), per_round),
                                           ("predict_batch32_s", lambda: pyfunc.predict(batch), max(1, per_round // 10))):
                    call()  # warm
                    samples.setdefault(f"{key}_{name}", []).append(median_seconds(call, repeats))
    finally:
        model.engine = served
    results: dict = {"served_engine": served.name, "model_device": str(model.device)}
    for key, values in samples.items():
        seconds = float(np.median(values))
        if "_one_ms" in key:
            results[key] = 1000 * seconds
        else:
            results[key.replace("batch32_s", "batch32_img_per_s")] = 32 / seconds
    if len(engines) == 2:
        for key in ("engine_one_ms", "predict_one_ms"):
            results[key.replace("_ms", "_onnx_speedup")] = results[f"{key}_torch"] / results[f"{key}_onnxruntime"]
        for key in ("engine_batch32", "predict_batch32"):
            results[f"{key}_onnx_speedup"] = (results[f"{key}_img_per_s_onnxruntime"] / results[f"{key}_img_per_s_torch"])
    return results


def time_prediction(jpegs: list[bytes], cfg: TrainConfig, serve: bool, requests: int = 100, rounds: int = 3) -> dict:
    """Latency of the logged pyfunc for ``cfg``'s model (its ``tta`` views) on real JPEG files:
    both engines in process, and the served model (ONNX Runtime) over HTTP."""
    spec = cfg.preprocess_spec()
    encoded = [base64.b64encode(j).decode("ascii") for j in jpegs]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            experiment_id = mlflow.MlflowClient().create_experiment("bench")
            model = build_model(cfg.model, cfg.channels).eval()
            inputs = np.stack([preprocess(image, spec) for image in (decode_for_model(j, spec) for j in jpegs)])
            _, graph, difference = checked_engine(Scorer(model, spec, cfg.tta), inputs, torch.device("cpu"))
            results["onnx_max_probability_difference"] = difference
            with mlflow.start_run(experiment_id=experiment_id):
                model_uri = tracking.log_classifier(model, cfg.model, spec, 0.5, ThresholdRule.validation(0.9),
                                                    jpegs[0], onnx_graph=graph, extra_settings={"tta": cfg.tta})
            results.update(time_engines(mlflow.pyfunc.load_model(model_uri), encoded, requests, rounds))
            if serve:
                env = {**os.environ, **SERVE_ENV, "MLFLOW_TRACKING_URI": uri}
                with model_server(model_uri, env) as (url, _):
                    for _ in range(5):
                        post_images(url, encoded[:1])
                    latencies = []
                    for i in range(requests):
                        start = time.perf_counter()
                        post_images(url, [encoded[i % len(encoded)]])
                        latencies.append(time.perf_counter() - start)
                results["serve_one_ms_p50"] = 1000 * float(np.percentile(latencies, 50))
                results["serve_one_ms_p99"] = 1000 * float(np.percentile(latencies, 99))
        finally:
            mlflow.set_tracking_uri(previous)
    return results


def sample_jpegs(location: Path, count: int = 32) -> list[bytes]:
    source = Source(location)
    try:
        records = discover(source)
        step = max(1, len(records) // count)
        return [source.read(r.path) for r in records[::step][:count]]
    finally:
        source.close()


# --- the benchmark ----------------------------------------------------------------------------

def run_benchmark(data: str | None, out: Path | None, steps: int = 20, serve: bool = True,
                  tricks: bool = False, rounds: int = 3, requests: int = 100,
                  models: tuple[str, ...] = tuple(ARCHITECTURES)) -> dict:
    """Run every measurement, print a table, and write JSON to ``out``."""
    device = select_device()
    location = Path(data) if data else demo_dataset(TrainConfig.demo_size, 0, cache_dir())
    spec = PreprocessSpec(img_size=NOTEBOOK["img_size"], channels=NOTEBOOK["channels"], color_constancy=False,
                          crop_lesion=False)
    results: dict = {"device": str(device), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "torch_version": torch.__version__, "data": str(location.resolve()),
                     "glibc_memory_recycling": glibc_mallopt() is not None,
                     "settings": {**NOTEBOOK, "timed_steps": steps, "warmup_steps": WARMUP_STEPS,
                                  "configurations": CONFIGURATIONS}}
    log.info("preparing the dataset cold and from the cache")
    prep = time_preparation(location, spec)
    prepared = prep.pop("_data")
    results.update(prep)
    train = prepared.indices("train")
    images, labels = prepared.images[train], prepared.labels[train]

    results["gemm_gflops"] = gemm_gflops(device)
    log.info("timing the notebook's training loop")
    img_per_s, flops = time_notebook_training(images, labels, steps)
    results["notebook_train_device"] = "cpu"  # the notebook's loop as it was written
    results["notebook_train_img_per_s"] = img_per_s
    results["notebook_train_gflops"] = img_per_s * flops / 1e9
    results["notebook_gemm_fraction"] = results["notebook_train_gflops"] / results["gemm_gflops"]
    for config, (model_name, size, channels, batch) in CONFIGURATIONS.items():
        log.info("timing this project's training in the %s configuration", config)
        config_spec = PreprocessSpec(img_size=size, channels=channels, color_constancy=False, crop_lesion=False)
        img_per_s, flops = time_training(model_name, resize_batch(images, size, channels), labels, config_spec,
                                         batch, steps, device)
        results[f"train_img_per_s_{config}"] = img_per_s  # on results["device"]
        results[f"gemm_fraction_{config}"] = img_per_s * flops / 1e9 / results["gemm_gflops"]
    results["train_speedup_vs_notebook"] = results["train_img_per_s_notebook"] / results["notebook_train_img_per_s"]
    if tricks:
        log.info("timing each speed trick against plain PyTorch")
        results.update(time_tricks(images, labels, steps, device, rounds))

    results["predict_settings"] = {"model": DEFAULT.model, "img_size": DEFAULT.img_size,
                                   "channels": DEFAULT.channels, "serve_env": SERVE_ENV}
    jpegs, serve = sample_jpegs(location), serve and shutil.which("uvicorn") is not None
    # The unprefixed figures are the default model's; every named model's are kept with its name,
    # and the default model's with each test-time augmentation as tta_<views>_.
    for name in sorted(models, key=lambda m: m != DEFAULT.model):
        log.info("timing prediction of %s", name)
        timed = time_prediction(jpegs, dataclasses.replace(DEFAULT, model=name), serve, requests)
        results.update({f"{name}_{key}": value for key, value in timed.items()})
        if name == DEFAULT.model:
            results.update(timed)
    for tta in (t for t in TTA_VIEWS if t != DEFAULT.tta):
        log.info("timing prediction of %s with tta=%s", DEFAULT.model, tta)
        timed = time_prediction(jpegs, dataclasses.replace(DEFAULT, tta=tta), serve, requests)
        results.update({f"tta_{tta}_{key}": value for key, value in timed.items()})

    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return results


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
