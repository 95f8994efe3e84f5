import json

import numpy as np
import torch

from melanoma.bench import time_tricks, run_benchmark
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
