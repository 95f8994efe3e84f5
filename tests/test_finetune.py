"""Site fine-tuning: cross-fitting never scores a photo with a model that trained on it (nor on
another photo of its patient), the guard keeps the threshold-only version where fine-tuning
cannot help, the fine-tuned site version logs, registers, serves and states its settings, and
bad input is named."""

import base64
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from melanoma import finetune as tuning
from melanoma.classifier.errors import SettingsError
from melanoma.classifier.models import build_model
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.cli import main
from melanoma.config import AdaptSettings
from melanoma.data.records import DataError
from melanoma.workflows.adapt import run_adaptation

SPEC = PreprocessSpec(img_size=32, channels=3)
CPU = torch.device("cpu")


def numbered_images(n: int) -> np.ndarray:
    """Image i is filled with the value i: which photos a model saw can be read off its inputs."""
    return np.repeat(np.arange(n, dtype=np.uint8), 3 * 32 * 32).reshape(n, 3, 32, 32)


def test_cross_fitting_scores_each_photo_with_models_that_never_saw_its_patient(monkeypatch):
    n = 60
    images, labels = numbered_images(n), np.arange(n) % 2
    groups = np.arange(n) // 3  # three photos per patient, of both classes
    seen_by_fold: list[set[int]] = []

    def spy_finetune(network, spec, train_images, train_labels, recipe, epochs, device, seed, **kwargs):
        seen_by_fold.append({int(image[0, 0, 0]) for image in train_images})
        for epoch in range(1, epochs + 1):
            kwargs["on_epoch"](epoch, spy_scorer)
        return network

    scored: list[tuple[set[int], set[int]]] = []

    def spy_predict(scorer, batch, spec, device, **kwargs):
        if scorer is spy_scorer:
            scored.append(({int(image[0, 0, 0]) for image in batch}, seen_by_fold[-1]))
        return torch.zeros(len(batch), 2)

    spy_scorer = object()
    monkeypatch.setattr(tuning, "finetune", spy_finetune)
    monkeypatch.setattr(tuning, "predict_logits", spy_predict)
    tuning.cross_fit(build_model("cnn", 3), SPEC, images, labels, groups, [tuning.Recipe("all", 1e-4)], epochs=2,
                     folds=4, device=CPU)
    assert len(scored) == 4 * 2  # every fold, after every epoch
    held_out = set()
    for photos, trained_on in scored:
        assert not photos & trained_on  # never a photo the model trained on
        patients = {groups[i] for i in photos}
        assert not patients & {groups[i] for i in trained_on}  # nor another photo of its patient
        held_out |= photos
    assert held_out == set(range(n))  # every photo scored out of fold


def test_folds_refuse_a_site_too_small_for_them_naming_the_counts():
    labels = np.r_[np.ones(5, int), np.zeros(40, int)]
    with pytest.raises(DataError, match="needs at least 10 photos of each class; the site has 5 melanomas and 40 benign"):
        tuning.site_folds(labels, np.arange(45), folds=5, seed=0)
    with pytest.raises(DataError, match="no malignant images"):
        tuning.site_folds(np.zeros(40, int), np.arange(40), folds=2, seed=0)
    with pytest.raises(Exception, match="write LAYERS:LR"):
        tuning.parse_recipes("all")


def test_the_guard_keeps_the_model_where_fine_tuning_cannot_help():
    """A site whose labels are noise: nothing to learn, so the gain's interval reaches zero."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 3, 32, 32), dtype=np.uint8)
    labels = rng.permutation(np.r_[np.ones(30, int), np.zeros(30, int)])
    torch.manual_seed(0)
    result = tuning.finetune_for_site(build_model("cnn", 3).eval(), SPEC, images, labels, np.arange(60),
                                      [tuning.Recipe("all", 1e-3)], epochs=2, folds=3, device=CPU, resamples=200)
    low, high = result.gain_interval
    assert low <= 0 <= high and not result.accepted and result.network is None


def test_fine_tuning_changes_only_what_its_recipe_names():
    torch.manual_seed(0)
    network = build_model("cnn", 3).eval()
    images, labels = numbered_images(16), np.arange(16) % 2
    head = tuning.finetune(network, SPEC, images, labels, tuning.Recipe("head", 1e-2), 1, CPU)
    changed = {k for k, v in head.state_dict().items() if not torch.equal(v, network.state_dict()[k])}
    assert changed and all(k.startswith("classifier") or k.startswith("fc") or "head" in k for k in changed), changed
    everything = tuning.finetune(network, SPEC, images, labels, tuning.Recipe("all", 1e-2), 1, CPU)
    assert not torch.equal(everything.state_dict()["features.0.0.weight"], network.state_dict()["features.0.0.weight"])


def test_the_fold_models_are_the_models_that_scored_their_held_out_photos():
    """Averaged, they are what the out-of-fold scores (and so the site's threshold) describe."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    labels, groups = np.arange(24) % 2, np.arange(24) // 2
    network = build_model("cnn", 3).eval()  # with dropout: its draws are seeded too
    recipe = tuning.Recipe("all", 1e-3)
    crossfit = tuning.cross_fit(network, SPEC, images, labels, groups, [recipe], epochs=2, folds=3, device=CPU)
    members = tuning.fold_models(network, SPEC, images, labels, groups, recipe, 2, 3, CPU)
    assert len(members) == 3
    for member, (_, held) in zip(members, tuning.site_folds(labels, groups, 3, 0)):
        again = tuning.predict_logits(tuning.Scorer(member, SPEC), images[held], None, CPU)
        torch.testing.assert_close(again, crossfit.tuned[(str(recipe), 2)][held])


def test_the_site_model_is_the_fold_models_averaged_or_one_model_on_all_photos():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = (rng.integers(0, 60, (40, 3, 32, 32)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    torch.manual_seed(0)
    network = build_model("cnn", 3).eval()
    recipe = [tuning.Recipe("all", 1e-3)]
    folds = tuning.finetune_for_site(network, SPEC, images, labels, np.arange(40), recipe, 2, 3, CPU, resamples=200)
    assert folds.accepted and isinstance(folds.network, torch.nn.ModuleList) and len(folds.network) == 3
    one = tuning.finetune_for_site(network, SPEC, images, labels, np.arange(40), recipe, 2, 3, CPU, resamples=200,
                                   site_model="all")
    assert one.accepted and not isinstance(one.network, torch.nn.ModuleList)
    with pytest.raises(SettingsError, match="site_model must be one of"):
        AdaptSettings(model="m", site="s", data="d", finetune=True, site_model="every").validate()


@pytest.fixture
def trained_model(trained_runs, monkeypatch) -> str:
    trained_runs.activate(monkeypatch)
    return f"runs:/{trained_runs.cnn}/model"


def swapped_site(demo_root, tmp_path):
    """The demo set with its classes swapped: the model ranks this site's patients backwards,
    and fine-tuning on them can only help."""
    site = tmp_path / "swapped"
    for split in ("train", "test"):
        shutil.copytree(demo_root / split / "benign", site / split / "malignant")
        shutil.copytree(demo_root / split / "malignant", site / split / "benign")
    return site


def test_a_fine_tuned_site_version_logs_registers_serves_and_states_its_settings(trained_model, demo_root, tmp_path):
    settings = AdaptSettings(model=trained_model, site="clinic-b", data=str(swapped_site(demo_root, tmp_path)),
                             min_melanomas=5, bootstrap=200, finetune=True, recipes="all:3e-3", finetune_epochs=3,
                             folds=3, registered_model="finetune-test")
    with mlflow.start_run() as run:
        summary = run_adaptation(settings)
    assert summary["finetuned"], summary
    assert summary["crossfit_auc_after"] > summary["crossfit_auc_before"] + 0.2
    assert summary["crossfit_auc_gain_ci"][0] > 0
    record = MlflowClient().get_run(run.info.run_id).data
    assert record.params["finetune"] == "true" and record.tags["finetuned"] == "true"
    assert record.metrics["finetune_accepted"] == 1.0 and record.metrics["finetune_epochs"] == summary["finetune_epochs"]
    assert len(MlflowClient().get_metric_history(run.info.run_id, "finetune_oof_auc_all_lr0.003")) == 3
    assert "forgetting_melanoma_cancer_dataset_auc_base" in record.metrics  # the base run's validation photos
    version = MlflowClient().get_model_version_by_alias("finetune-test", "site-clinic-b")
    assert "### Fine-tuning on the site's photos" in version.description
    assert "Chosen: `all:0.003`" in version.description and "| training source" in version.description
    assert "averages the 3 fold models" in version.description
    served = mlflow.pyfunc.load_model(summary["registered"])
    model = served.unwrap_python_model().model
    assert model.settings["site"]["finetuned"]["recipe"] == "all:0.003"
    assert model.settings["site"]["finetuned"]["site_model"] == "folds" and len(model.members) == 3
    assert model.rule.name == "site", summary["threshold_reason"]
    photos = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode()
                                     for f in sorted((demo_root / "test").glob("*/*.jpg"))]})
    answers = served.predict(photos)
    base_answers = mlflow.pyfunc.load_model(trained_model).predict(photos)
    assert not np.allclose(answers["malignant_probability"], base_answers["malignant_probability"], atol=1e-3)
    expected = np.where(answers["malignant_probability"] >= model.threshold, "malignant", "benign")
    assert list(answers["label"]) == list(expected)  # at the site's threshold


def test_adapt_names_what_fine_tuning_cannot_work_with(trained_model, demo_root, tmp_path, capsys):
    few = tmp_path / "few"
    shutil.copytree(demo_root / "test", few)  # 4 photos of each class
    assert main(["adapt", "--model", trained_model, "--site", "x", "--data", str(few), "--finetune", "true",
                 "--register", "false", "--bootstrap", "100"]) == 2
    assert "the site has 4 melanomas and 4 benign photos" in capsys.readouterr().err
    assert main(["adapt", "--model", trained_model, "--site", "x", "--data", str(few), "--finetune", "true",
                 "--recipes", "some:1e-3"]) == 2
    assert "layers must be one of ('all', 'head')" in capsys.readouterr().err
    assert main(["adapt", "--model", "models:/no-such-model@champion", "--site", "x", "--data", str(few),
                 "--finetune", "true"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_an_ensemble_is_fine_tuned_member_by_member_on_its_averaged_logits():
    torch.manual_seed(0)
    pair = torch.nn.ModuleList([build_model("cnn", 3).eval(), build_model("cnn", 3).eval()])
    images, labels = numbered_images(16), np.arange(16) % 2
    tuned = tuning.finetune(pair, SPEC, images, labels, tuning.Recipe("all", 1e-2), 1, CPU)
    assert isinstance(tuned, torch.nn.ModuleList) and len(tuned) == 2
    for before, after in zip(pair, tuned):  # every member learned, the originals untouched
        assert not torch.equal(before.state_dict()["features.0.0.weight"], after.state_dict()["features.0.0.weight"])
