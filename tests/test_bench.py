import json

from melanoma.bench import run_benchmark

REQUIRED = ["decode_img_per_s", "cached_img_per_s", "notebook_train_img_per_s", "cnn_train_img_per_s",
            "train_speedup_vs_notebook", "gemm_gflops", "cnn_train_gflops", "resnet18_train_gflops",
            "cnn_gemm_fraction", "resnet18_gemm_fraction", "notebook_gemm_fraction", "predict_one_ms",
            "predict_batch32_img_per_s", "cnn_predict_one_ms", "resnet18_predict_one_ms"]


def test_bench_measures_every_stage_and_writes_json(demo_root, tmp_path):
    out = tmp_path / "bench.json"
    results = run_benchmark(str(demo_root), out, steps=1, serve=False)
    saved = json.loads(out.read_text())
    for key in REQUIRED:
        assert saved[key] > 0, key
    assert saved["settings"]["batch_size"] == 16 and saved["settings"]["img_size"] == 224
    assert saved["device"] == "cpu" and saved["torch_version"]
    assert saved["predict_settings"]["serve_env"] == {"OMP_NUM_THREADS": "1"}
    default = saved["predict_settings"]["model"]
    assert saved["predict_one_ms"] == saved[f"{default}_predict_one_ms"]
    assert results["train_speedup_vs_notebook"] == saved["cnn_train_img_per_s"] / saved["notebook_train_img_per_s"]
    # The notebook's network and ours do the same arithmetic: their FLOPs per image agree.
    notebook_flops = saved["notebook_train_gflops"] / saved["notebook_train_img_per_s"]
    assert abs(notebook_flops / (saved["cnn_train_gflops"] / saved["cnn_train_img_per_s"]) - 1) < 1e-9
