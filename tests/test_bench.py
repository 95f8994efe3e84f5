import json

import numpy as np
import torch

from melanoma.bench import run_benchmark, time_tricks
from melanoma.config import TrainConfig
from melanoma.data.demo import make_demo_dataset

REQUIRED = ["decode_img_per_s", "cached_img_per_s", "notebook_train_img_per_s", "train_img_per_s_notebook",
            "train_img_per_s_default", "train_speedup_vs_notebook", "gemm_gflops", "gemm_fraction_notebook",
            "gemm_fraction_default", "notebook_gemm_fraction", "engine_one_ms_onnxruntime", "engine_one_ms_torch",
            "engine_batch32_img_per_s_onnxruntime", "engine_batch32_img_per_s_torch", "engine_one_onnx_speedup",
            "predict_one_ms_onnxruntime", "predict_one_ms_torch", "predict_batch32_img_per_s_onnxruntime",
            f"{TrainConfig.model}_predict_one_ms_onnxruntime", "cnn_predict_one_ms_onnxruntime",
            "tta_flip_predict_one_ms_onnxruntime", "tta_dihedral_engine_one_ms_torch"]


def test_bench_measures_every_stage_and_writes_json(tmp_path):
    # Photos at least as large as the default model's input (the served model refuses smaller).
    data = make_demo_dataset(tmp_path / "melanoma_cancer_dataset", per_class=8, seed=1, size=128)
    out = tmp_path / "bench.json"
    results = run_benchmark(str(data), out, steps=1, serve=False, requests=3,
                            models=(TrainConfig.model, "cnn"))
    saved = json.loads(out.read_text())
    for key in REQUIRED:
        assert saved[key] > 0, key
    assert saved["settings"]["batch_size"] == 16 and saved["settings"]["img_size"] == 224
    assert saved["device"] == "cpu" and saved["torch_version"] and saved["cpu"]
    assert saved["predict_settings"]["serve_env"] == {"OMP_NUM_THREADS": "1"}
    default = saved["predict_settings"]["model"]
    assert saved["predict_one_ms_onnxruntime"] == saved[f"{default}_predict_one_ms_onnxruntime"]
    assert saved["onnx_max_probability_difference"] <= 1e-4
    assert results["train_speedup_vs_notebook"] == saved["train_img_per_s_notebook"] / saved["notebook_train_img_per_s"]
    # The notebook's network and ours do the same arithmetic: their FLOPs per image agree.
    notebook_flops = saved["notebook_train_gflops"] / saved["notebook_train_img_per_s"]
    ours = saved["gemm_fraction_notebook"] * saved["gemm_gflops"] / saved["train_img_per_s_notebook"]
    assert abs(notebook_flops / ours - 1) < 1e-9


def test_each_trick_is_switched_off_alone_and_interleaved(monkeypatch):
    import melanoma.bench as bench

    calls = []

    def fake_time_training(model_name, images, labels, spec, batch, steps, device, **switches):
        calls.append(switches)
        return (100.0 if not switches else 50.0), 1.0

    monkeypatch.setattr(bench, "time_training", fake_time_training)
    images = np.random.default_rng(0).integers(0, 255, (16, 3, 32, 32), dtype=np.uint8)
    results = time_tricks(images, np.arange(16) % 2, steps=1, device=torch.device("cpu"), rounds=2,
                          configurations={"tiny": ("cnn", 32, 1, 8)})
    # on, off, on, off for one trick, then the other: each off-run switches exactly one trick off.
    assert calls == [{}, {"recycle": False}] * 2 + [{}, {"channels_last": False}] * 2
    assert results["trick_recycle_tiny_speedup"] == 2.0 and results["trick_channels_last_tiny_img_per_s_off"] == 50.0


def test_the_bench_times_both_engines_where_onnx_runtime_cannot_serve_on_the_device(monkeypatch, tmp_path):
    """As on a CUDA machine whose ONNX Runtime has no CUDA provider: the model serves with PyTorch,
    and the bench times it beside ONNX Runtime on the CPU and says which one serves."""
    import base64

    import cv2
    import mlflow

    from melanoma import tracking
    from melanoma.bench import time_engines
    from melanoma.classifier import logged
    from melanoma.classifier.decision import ThresholdRule
    from melanoma.classifier.engine import checked_engine
    from melanoma.classifier.inference import Scorer
    from melanoma.classifier.models import build_model
    from melanoma.classifier.preprocessing import PreprocessSpec

    spec = PreprocessSpec(img_size=32, channels=3)
    model = build_model("cnn", 3).eval()
    photos = [cv2.imencode(".jpg", np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
              for i in range(2)]
    _, graph, _ = checked_engine(Scorer(model, spec), np.zeros((2, 3, 32, 32), np.uint8), torch.device("cpu"))
    with mlflow.start_run():
        uri = tracking.log_classifier(model, "cnn", spec, 0.5, ThresholdRule.validation(0.9), photos[0],
                                      onnx_graph=graph)
    monkeypatch.setattr(logged, "onnx_usable", lambda device: False)
    results = time_engines(mlflow.pyfunc.load_model(uri), [base64.b64encode(p).decode() for p in photos], 2, 1)
    assert results["served_engine"] == "torch" and results["model_device"] == "cpu"
    assert results["engine_one_ms_torch"] > 0 and results["engine_one_ms_onnxruntime"] > 0
    assert results["predict_one_onnx_speedup"] == results["predict_one_ms_torch"] / results["predict_one_ms_onnxruntime"]
