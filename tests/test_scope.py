"""The in-scope check: fitted with every single-network model, it keeps the model's own
validation photos in scope at the stated share and flags generated pictures; the served response,
the predict CSV and the page carry it; the exported graph computes it as PyTorch does; a model
logged without one says so."""

import base64
import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from melanoma.batch import predict_files
from melanoma.card import CARD_FILE
from melanoma.classifier.engine import OnnxEngine, export_onnx
from melanoma.classifier.inference import Scorer, scope_features
from melanoma.classifier.logged import load_logged_model
from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec, preprocess
from melanoma.classifier.pyfunc import LABEL_OUT_OF_SCOPE_ENV, MelanomaClassifier
from melanoma.classifier.scope import (
    IN_SCOPE_SHARE,
    ScopeModel,
    colourfulness,
    fit_scope,
    learn_boundary,
    threshold_for_share,
    threshold_for_sources,
)
from melanoma.cli import main
from melanoma.data.out_of_scope import generated_pictures

CPU = torch.device("cpu")


@pytest.fixture
def model_uri(trained_runs, monkeypatch) -> str:
    trained_runs.activate(monkeypatch)
    return f"runs:/{trained_runs.cnn}/model"


def noise_jpeg(seed: int = 0) -> str:
    import cv2

    image = np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    return base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()


def lesion_jpeg(demo_root) -> str:
    return base64.b64encode(next((demo_root / "test" / "malignant").glob("*.jpg")).read_bytes()).decode()


def test_a_trained_model_keeps_its_validation_photos_in_scope_and_flags_generated_pictures(model_uri, trained_runs):
    metrics = mlflow.MlflowClient().get_run(trained_runs.cnn).data.metrics
    assert metrics["scope_val_in_scope"] >= IN_SCOPE_SHARE  # by construction, on the validation photos
    model = load_logged_model(model_uri)
    assert model.scope is not None and model.engine.name == "onnxruntime"
    photos = [np.full((64, 64, 3), 128, np.uint8)]
    pictures = generated_pictures(np.random.default_rng(5), photos, per_kind=6)
    caught = {kind: float(np.mean(~model.in_scope(model.assess(np.stack([preprocess(p, model.spec) for p in images]))[1])))
              for kind, images in pictures.items()}
    assert np.mean(list(caught.values())) >= 0.9, caught
    for kind in ("flat colour", "noise", "document", "checkerboard"):
        assert caught[kind] >= 0.8, caught
    assert metrics["scope_generated_noise_caught"] == pytest.approx(1.0)
    assert metrics["scope_generated_grey_photo_caught"] == pytest.approx(1.0)
    card = mlflow.artifacts.load_text(f"{model_uri.rsplit('/', 1)[0]}/{CARD_FILE}")
    assert "grey photo 100%" in card and "A picture with less colour than a tenth" in card
    assert "Photos of skin taken without a dermoscope" in card and "mostly stay in scope" in card


def test_a_grey_picture_of_a_lesion_is_out_of_scope_where_its_colour_photo_is_not(model_uri, demo_root):
    """Radiographs, scans, black-and-white photos: a dermoscopy photo is never grey."""
    import cv2

    model = load_logged_model(model_uri)
    assert model.scope.coloured
    photos = [cv2.imread(str(f))[:, :, ::-1] for f in sorted((demo_root / "train" / "benign").glob("*.jpg"))[:8]]
    grey = [np.repeat(cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2) for p in photos]
    colour_in = model.in_scope(model.assess(np.stack([preprocess(p, model.spec) for p in photos]))[1])
    grey_in = model.in_scope(model.assess(np.stack([preprocess(p, model.spec) for p in grey]))[1])
    assert colour_in.mean() >= 0.75 and not grey_in.any(), (colour_in, grey_in)


def test_the_colour_limit_multiplies_the_score_of_paler_pictures_only():
    rng = np.random.default_rng(0)
    validation_colour = np.linspace(0.05, 0.2, 401)
    scope = fit_scope(rng.normal(size=(500, 12)), components=4).with_colour_limit(validation_colour)
    assert float(scope.colour_limit) == pytest.approx(0.1 * np.quantile(validation_colour, 0.005))
    features = torch.from_numpy(rng.normal(size=(3, 12)))
    plain = scope.distance(features)
    colour = torch.tensor([0.1, float(scope.colour_limit) / 2, 0.0])
    torch.testing.assert_close(scope(features, colour), plain * torch.tensor([1.0, 2.0, 1000.0]))
    with pytest.raises(ValueError, match="colourfulness"):
        scope(features)
    assert ScopeModel.from_state(scope.state()).coloured


def test_every_source_keeps_the_stated_share_where_a_pooled_threshold_would_leave_a_small_one_out():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 2000), rng.normal(1.5, 1, 200)]  # a large source, and a smaller, further one
    sources = np.array(["large"] * 2000 + ["small"] * 200)
    pooled = threshold_for_share(scores)
    assert np.mean(scores[sources == "small"] <= pooled) < IN_SCOPE_SHARE  # the small source pays for the pooling
    threshold = threshold_for_sources(scores, sources)
    for source in ("large", "small"):
        assert np.mean(scores[sources == source] <= threshold) >= IN_SCOPE_SHARE
    assert threshold == max(threshold_for_share(scores[sources == s]) for s in ("large", "small"))
    assert threshold_for_sources(scores, np.full(len(scores), "one")) == pooled  # one source: as before
    # A source of 20 photos cannot leave 1 % out: its furthest photo would be its threshold.
    tiny = np.r_[scores, rng.normal(0, 1, 19), 50.0]
    assert threshold_for_sources(tiny, np.r_[sources, ["tiny"] * 20]) == pytest.approx(threshold, rel=0.05)


def test_a_model_given_out_of_scope_pictures_learns_a_boundary_and_says_so(demo_root, tmp_path, capsys):
    import cv2

    assert main(["train", "--model", "cnn", "--data", str(demo_root), "--scope_negatives", "/no/such/folder"]) == 2
    assert "/no/such/folder does not exist: expected a folder (or .zip) of pictures" in capsys.readouterr().err

    folder = tmp_path / "not_dermoscopy"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):  # pictures of stripes: not what the demo's lesions look like
        stripes = np.zeros((96, 96, 3), np.uint8)
        stripes[:, (i % 4) * 3::12] = rng.integers(100, 256, 3)
        cv2.imwrite(str(folder / f"stripes_{i}.png"), stripes)
    (folder / "notes.txt").write_text("not a picture: left alone")
    assert main(["train", "--model", "cnn", "--data", str(demo_root), "--epochs", "1", "--img_size", "32",
                 "--batch_size", "16", "--bootstrap", "0", "--gradcam_images", "0",
                 "--scope_negatives", str(folder)]) == 0
    run = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("melanoma").experiment_id])[0]
    assert run.data.params["scope_negatives"] == str(folder)
    assert run.data.metrics["scope_negatives_supplied"] == 12
    assert run.data.metrics["scope_val_in_scope"] >= IN_SCOPE_SHARE
    model = load_logged_model(f"runs:/{run.info.run_id}/model")
    assert model.scope.learned
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{CARD_FILE}")
    assert "learned a boundary from 12 pictures supplied as out of scope" in card
    assert "mostly stay in scope" not in card


def flower_jpeg() -> str:
    """The issue's flower: the photo scikit-learn ships (sklearn.datasets.load_sample_images)."""
    import sklearn.datasets

    return base64.b64encode((Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg").read_bytes()).decode()


def test_the_served_answer_says_whether_a_photo_is_in_scope(model_uri, demo_root, monkeypatch):
    served = mlflow.pyfunc.load_model(model_uri)
    threshold = served.unwrap_python_model().model.threshold
    frame = pd.DataFrame({"image": [lesion_jpeg(demo_root), noise_jpeg()]})
    out = served.predict(frame)
    assert list(out["scope_check"]) == ["in scope", "out of scope"] and list(out["in_scope"]) == [True, False]
    flower = served.predict(pd.DataFrame({"image": [flower_jpeg()]}))  # once called malignant at 0.78 (#33)
    assert list(flower["scope_check"]) == ["out of scope"] and list(flower["label"]) == ["out of scope"]
    assert out["scope_score"][1] > out["scope_score"][0]
    expected = ["malignant" if p >= threshold else "benign" for p in out["malignant_probability"]]
    assert out["label"][0] == expected[0] and out["label"][1] == "out of scope"  # its probability kept
    labelled = served.predict(frame, params={"label_out_of_scope": True})
    assert list(labelled["label"]) == expected and labelled["malignant_probability"].equals(out["malignant_probability"])
    monkeypatch.setenv(LABEL_OUT_OF_SCOPE_ENV, "true")  # the deployment's choice
    assert list(served.predict(frame)["label"]) == expected


def test_predict_writes_the_check_into_its_csv(model_uri, demo_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "lesion.jpg").write_bytes(base64.b64decode(lesion_jpeg(demo_root)))
    (folder / "noise.jpg").write_bytes(base64.b64decode(noise_jpeg()))
    predict_files(model_uri, [folder], tmp_path / "out.csv")
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = {row["path"].rsplit("/", 1)[1]: row for row in csv.DictReader(handle)}
    assert rows["lesion.jpg"]["scope_check"] == "in scope" and rows["lesion.jpg"]["in_scope"] == "True"
    assert rows["noise.jpg"]["scope_check"] == "out of scope" and rows["noise.jpg"]["label"] == "out of scope"
    assert float(rows["noise.jpg"]["scope_score"]) > float(rows["lesion.jpg"]["scope_score"])


def test_a_model_logged_without_the_check_says_it_is_absent(tmp_path):
    weights, settings = tmp_path / "weights.pt", tmp_path / "settings.json"
    torch.save(build_model("cnn", 3).state_dict(), weights)
    settings.write_text(json.dumps({"model": "cnn", "threshold": 0.5, "preprocess": {"img_size": 32, "channels": 3}}))
    classifier = MelanomaClassifier()
    classifier.load(weights, settings)
    out = classifier.predict(None, pd.DataFrame({"image": [noise_jpeg()]}))
    assert out["scope_check"][0] == "absent" and out["in_scope"][0] is None and np.isnan(out["scope_score"][0])
    assert out["label"][0] == ("malignant" if out["malignant_probability"][0] >= 0.5 else "benign")  # never guessed


@pytest.mark.parametrize("boundary", [False, True], ids=["distance and colour", "learned boundary too"])
def test_the_exported_graph_computes_the_scope_score_as_pytorch_does(boundary):
    torch.manual_seed(0)
    spec = PreprocessSpec(img_size=32, channels=3)
    network = build_model("cnn", 3).eval()
    images = np.random.default_rng(1).integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    inside, val = scope_features(network, images[:16], spec, CPU), scope_features(network, images[16:], spec, CPU)
    scope = fit_scope(inside, components=8)
    if boundary:
        flat = np.repeat(np.arange(0, 256, 32, dtype=np.uint8), 3 * 32 * 32).reshape(8, 3, 32, 32)
        scope = learn_boundary(scope, inside, scope_features(network, flat, spec, CPU), val)
    images[20:] = images[20:, :1]  # grey pictures: their scores are raised by the colour limit
    scope = scope.with_colour_limit(colourfulness(torch.from_numpy(images[:16])).numpy())
    colour = colourfulness(torch.from_numpy(images[16:]))
    scope.threshold = threshold_for_share(scope(torch.from_numpy(val), colour).detach().numpy())
    scorer = Scorer(network, spec, "flip", scope)
    graph = export_onnx(scorer, 3, 32)
    onnx_logits, onnx_scores = OnnxEngine(graph, views=4).outputs(images)
    with torch.inference_mode():  # PyTorch in fp32, as the graph runs
        torch_logits, torch_scores = scorer(torch.from_numpy(images))
    torch.testing.assert_close(onnx_scores, torch_scores, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.softmax(onnx_logits, 1), torch.softmax(torch_logits, 1), rtol=1e-3, atol=1e-3)
    restored = ScopeModel.from_state(scope.state())
    assert restored.threshold == scope.threshold and restored.learned == boundary and restored.coloured
    torch.testing.assert_close(restored(torch.from_numpy(val), colour), scope(torch.from_numpy(val), colour))


def test_a_learned_boundary_catches_what_the_distance_misses_and_keeps_the_validation_share():
    """Out-of-scope features off the training photos' along one direction but tighter in all the
    others: as near to them as their own by distance, and on the far side of a line."""
    rng = np.random.default_rng(0)
    inside, val, test = (rng.normal(size=(n, 40)) for n in (2000, 1000, 1000))
    shift = np.zeros(40)
    shift[3] = 5.0
    outside, unseen = (0.6 * rng.normal(size=(300, 40)) + shift for _ in range(2))
    distance = fit_scope(inside, components=16)
    learned = learn_boundary(distance, inside, outside, val)
    for scope in (distance, learned):
        scope.threshold = threshold_for_share(scope(torch.from_numpy(val)).numpy())

    def caught(scope, features):
        return float(np.mean(scope(torch.from_numpy(features)).numpy() > scope.threshold))

    assert caught(distance, unseen) < 0.3 and caught(learned, unseen) > 0.9
    assert caught(learned, test) < 0.03  # new photos like the training ones: in scope at about the stated share


def test_an_ensemble_carries_no_scope_model():
    spec = PreprocessSpec(img_size=32, channels=3)
    with pytest.raises(Exception, match="belongs to one network"):
        Scorer([build_model("cnn", 3), build_model("cnn", 3)], spec, "none", fit_scope(np.random.rand(10, 4), 2))
