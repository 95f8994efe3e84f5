"""Site adaptation: the site's threshold and its interval on synthetic scores, BatchNorm
statistics re-estimated (weights untouched), the site version's settings, alias and card, and
bad input."""

import shutil

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.cli import main
from melanoma.config import AdaptSettings
from melanoma.evaluate import Predictions
from melanoma.workflows.adapt import adapt_batchnorm, run_adaptation, site_operating_point


def synthetic_site(melanomas: int, benign: int, seed: int = 0) -> Predictions:
    """Melanoma scores uniform on [0.3, 1], benign on [0, 0.5]: the threshold that finds 90 % of
    the melanomas lies near 0.37 and leaves about 74 % of the benign lesions alone."""
    rng = np.random.default_rng(seed)
    probs = np.r_[rng.uniform(0.3, 1.0, melanomas), rng.uniform(0.0, 0.5, benign)]
    labels = np.r_[np.ones(melanomas, int), np.zeros(benign, int)]
    return Predictions(labels, probs, np.arange(len(labels)))


def test_the_site_threshold_and_the_interval_of_its_sensitivity_on_new_patients():
    big = site_operating_point(synthetic_site(2000, 2000), 0.9, resamples=200)
    assert big.threshold == pytest.approx(0.37, abs=0.02)
    assert big.specificity == pytest.approx(0.74, abs=0.03)
    low, high = big.sensitivity_interval
    assert low < 0.9 < high and high - low < 0.08
    small = site_operating_point(synthetic_site(20, 180), 0.9, resamples=200)
    assert small.melanomas == 20
    assert small.sensitivity_interval[1] - small.sensitivity_interval[0] > 3 * (high - low)  # few melanomas: unsure


def test_batchnorm_statistics_move_to_the_site_and_weights_stay():
    torch.manual_seed(0)
    model = build_model("cnn", 3).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    before = model.features[0][1].running_mean.clone()
    spec = PreprocessSpec(img_size=32, channels=3)
    bright = np.full((16, 3, 32, 32), 230, np.uint8)
    half = build_model("cnn", 3).eval()
    half.load_state_dict(model.state_dict())
    assert adapt_batchnorm(model, bright, spec, share=1.0) == 3
    adapt_batchnorm(half, bright, spec, share=0.5)
    site_mean = model.features[0][1].running_mean
    assert not torch.allclose(site_mean, before)
    torch.testing.assert_close(half.features[0][1].running_mean, (site_mean + before) / 2)
    for name, value in model.state_dict().items():
        if name in weights:
            torch.testing.assert_close(value, weights[name])  # weights untouched
    assert not model.training and not model.features[0][1].training


@pytest.fixture
def trained_model(trained_runs, monkeypatch) -> str:
    trained_runs.activate(monkeypatch)
    return f"runs:/{trained_runs.cnn}/model"



def test_only_the_first_layers_of_each_member_adapt_with_a_depth():
    torch.manual_seed(0)
    pair = torch.nn.ModuleList([build_model("cnn", 3).eval(), build_model("cnn", 3).eval()])
    before = [m.running_mean.clone() for m in pair.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bright = np.full((16, 3, 32, 32), 230, np.uint8)
    assert adapt_batchnorm(pair, bright, PreprocessSpec(img_size=32, channels=3), share=1.0, depth=1 / 3) == 2
    after = [m.running_mean for m in pair.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    moved = [not torch.allclose(a, b) for a, b in zip(after, before)]
    assert moved == [True, False, False, True, False, False]  # each member's first of three layers

def test_a_site_version_carries_its_threshold_alias_and_card_and_serves(trained_model, demo_root):
    settings = AdaptSettings(model=trained_model, site="clinic-a", data=str(demo_root), min_melanomas=5,
                             bootstrap=100, adabn=0.5, registered_model="adapt-test")
    with mlflow.start_run() as run:
        summary = run_adaptation(settings)
    client = MlflowClient()
    version = client.get_model_version_by_alias("adapt-test", "site-clinic-a")
    assert "## Site clinic-a" in version.description and "out-of-bootstrap" in version.description
    served = mlflow.pyfunc.load_model(summary["registered"])
    classifier = served.unwrap_python_model()
    assert classifier.model.settings["site"]["name"] == "clinic-a" and classifier.model.threshold == summary["threshold"]
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["threshold"] == summary["threshold"] == metrics["site_threshold"]  # 20 melanomas >= 5
    assert metrics["adabn_layers"] == 3
    jpeg = next((demo_root / "test" / "malignant").glob("*.jpg")).read_bytes()
    import base64

    import pandas as pd
    answer = served.predict(pd.DataFrame({"image": [base64.b64encode(jpeg).decode()]}))
    expected = "malignant" if answer["malignant_probability"][0] >= summary["threshold"] else "benign"
    assert answer["label"][0] == expected  # at the site's threshold
    # Too few melanomas for a trustworthy threshold: the model's is kept, and the run says why.
    with mlflow.start_run() as run:
        kept = run_adaptation(AdaptSettings(**{**settings.__dict__, "min_melanomas": 1000, "register": False}))
    original = mlflow.pyfunc.load_model(trained_model).unwrap_python_model().model.threshold
    assert kept["threshold"] == original and "fewer than 1000" in kept["threshold_reason"]


def test_bad_input_is_named(trained_model, demo_root, tmp_path, caplog, capsys):
    # A site with nevi only: no threshold (said why), unlabelled adaptation still works.
    nevi = tmp_path / "site_nevi" / "benign"
    shutil.copytree(demo_root / "test" / "benign", nevi)
    with mlflow.start_run():
        summary = run_adaptation(AdaptSettings(model=trained_model, site="nevi", data=str(nevi.parent), adabn=1.0,
                                               unlabelled=str(demo_root / "test"), bootstrap=50, register=False))
    assert "no malignant images" in summary["threshold_reason"] and "site_specificity" in summary
    assert main(["adapt", "--model", "models:/no-such-model@champion", "--site", "x", "--data", str(demo_root)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["adapt", "--model", trained_model, "--site", "x", "--data", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["adapt", "--model", trained_model, "--site", "bad name", "--data", str(demo_root)]) == 2
