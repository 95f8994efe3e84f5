import shlex
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from melanoma.classifier.errors import SettingsError
from melanoma.config import (
    LEGACY_SETTINGS,
    AdaptSettings,
    CrossvalSettings,
    EnsembleSettings,
    SearchSettings,
    TrainConfig,
    config_from_args,
    parse_bool,
    parse_params,
    same_value,
    settings_params,
)

ROOT = Path(__file__).resolve().parents[1]
QUALITY = TrainConfig(model="efficientnet_lite2", img_size=160, epochs=4, tta="flip")  # MLproject's quality recipe


def mlflow_default(value):
    """A setting's default as MLproject writes it (booleans as lower-case strings)."""
    return str(value).lower() if isinstance(value, bool) else value


@pytest.mark.parametrize("entry, settings, extra", [
    ("main", (TrainConfig(),), {"resume"}),
    ("quality", (QUALITY,), {"resume"}),
    ("search", (TrainConfig(), SearchSettings()), set()),
    ("crossval", (TrainConfig(), CrossvalSettings()), set()),
    ("adapt", (AdaptSettings(),), set()),
    ("ensemble", (EnsembleSettings(),), set()),
])
def test_mlproject_entry_points_take_their_settings_objects(entry, settings, extra):
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    expected = {f.name: getattr(s, f.name) for s in settings for f in fields(s)}
    assert set(spec["parameters"]) == set(expected) | extra
    for name, default in expected.items():
        assert spec["parameters"][name]["default"] == mlflow_default(default), name
        assert f"--{name} {{{name}}}" in spec["command"], name
    for name in extra:
        assert f"--{name} {{{name}}}" in spec["command"], name


@pytest.mark.parametrize("field, value, message", [
    ("model", "vgg", "unknown model"),
    ("wise_alpha", 0.5, "needs a model with pretrained weights"),
    ("freeze_epochs", 10, "must be below epochs"),
    ("drop_path", 0.1, "drop_path is for timm models"),
    ("channels", 2, "channels must be 1"),
    ("lr", 0.0, "lr must be positive"),
    ("img_size", 8, "img_size"),
    ("val_fraction", 1.5, "val_fraction"),
    ("crop_margin", -0.1, r"crop_margin must be in \[0, 2\]"),
    ("augment", "colour", "augment must be one of"),
])
def test_invalid_settings_are_named(field, value, message):
    model = {"wise_alpha": "cnn", "drop_path": "resnet18"}.get(field, TrainConfig.model)
    cfg = TrainConfig(**{"model": model, field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_parse_bool_accepts_the_usual_spellings():
    assert parse_bool("True") and parse_bool("1") and not parse_bool("false") and not parse_bool("0")
    with pytest.raises(Exception, match="expected true or false"):
        parse_bool("maybe")


def test_the_cli_help_does_not_import_torch():
    import subprocess
    import sys

    script = ("import sys; from melanoma.cli import build_parser; build_parser().format_help(); "
              "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)


def test_conda_env_installs_what_the_package_and_its_team_extra_need():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert {p.split("  #")[0] for p in pip} == set(project["dependencies"]) | set(project["optional-dependencies"]["team"])


def test_preprocessing_defaults_are_the_training_defaults():
    from melanoma.classifier.preprocessing import PreprocessSpec

    spec, cfg = PreprocessSpec(), TrainConfig()
    for name in ("img_size", "channels", "color_constancy", "mask_corners", "crop_lesion", "crop_margin"):
        assert getattr(spec, name) == getattr(cfg, name), name


def test_the_command_reports_bad_settings_in_one_line_and_lets_bugs_surface(monkeypatch, tmp_path, capsys):
    import melanoma.data.demo
    from melanoma import cli

    assert cli.main(["train", "--model", "vgg"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown model 'vgg': choose one of cnn, resnet18, efficientnet_lite0, efficientnet_lite1, "
        "efficientnet_lite2, or timm:NAME / torchvision:NAME for any architecture of those libraries"]

    def bug(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(melanoma.data.demo, "make_demo_dataset", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["demo-data", str(tmp_path / "demo")])


SETTINGS = [TrainConfig(model="cnn", epochs=5, crop_lesion=False, lr=3e-4, external="a b,c", tta="flip"),
            SearchSettings(study_name="", continue_on_trial_error=True), CrossvalSettings(final=False),
            AdaptSettings(model="models:/m@champion", site="a", data="/d", force_threshold=True),
            EnsembleSettings(runs="r1,r2", alias="")]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: type(s).__name__)
def test_settings_params_round_trip_through_the_commands_parsers(settings):
    params = settings_params(settings)
    assert parse_params(params, type(settings)) == settings
    # The command line as `mlflow run` builds it, split by the shell, parses to the same settings.
    from melanoma import cli

    parser = cli.build_parser()
    command = {TrainConfig: "train", SearchSettings: "search", CrossvalSettings: "crossval", AdaptSettings: "adapt",
               EnsembleSettings: "ensemble"}[type(settings)]
    words = shlex.split(" ".join(f"--{k} {v}" for k, v in params.items()))
    extra = ["--runs", "r1,r2"] if command == "ensemble" else []
    args = parser.parse_args([command, *extra, *words]) if command != "adapt" else parser.parse_args([command, *words])
    assert config_from_args(args, type(settings)) == settings


@pytest.mark.parametrize("entry, settings", [
    ("main", TrainConfig()), ("quality", QUALITY), ("search", SearchSettings()), ("crossval", CrossvalSettings()),
    ("adapt", AdaptSettings()), ("ensemble", EnsembleSettings())])
def test_settings_params_are_what_mlflow_run_logs_for_the_defaults(entry, settings):
    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(ROOT))
    logged, _ = project.get_entry_point(entry).compute_parameters({}, storage_dir=None)  # what `mlflow run` logs
    for name, value in settings_params(settings).items():
        assert same_value(logged[name], value), (name, logged[name], value)
        if not isinstance(getattr(settings, name), float):  # floats: "3" in YAML for an int default
            assert logged[name] == value, (name, logged[name], value)


def test_a_spelling_is_not_a_conflict_but_another_value_is():
    assert same_value("False", "false") and same_value("1e-3", "0.001") and same_value("''", "")
    assert same_value("5", "5.0") and not same_value("5", "6") and not same_value("flip", "none")


def test_a_conflicting_param_raises_naming_both_values():
    import mlflow

    from melanoma import tracking

    with mlflow.start_run():
        mlflow.log_params({"lr": "1e-3", "register": "True"})
        tracking.log_params({"lr": "0.001", "register": "true", "seed": "1"})  # spellings of the same values
        assert mlflow.get_run(mlflow.active_run().info.run_id).data.params["seed"] == "1"
        with pytest.raises(SettingsError, match=r"lr: logged '1e-3', now '0.01'"):
            tracking.log_params({"lr": "0.01"})


def test_an_old_runs_missing_settings_take_what_it_trained_with_not_todays_defaults():
    params = settings_params(TrainConfig(model="cnn"))
    for name in ("crop_margin", "split_seed", "optimizer", "weight_decay"):
        params.pop(name)
    cfg = parse_params(params)
    assert cfg.optimizer == LEGACY_SETTINGS["optimizer"] != TrainConfig.optimizer
    assert cfg.weight_decay == 0.0 != TrainConfig.weight_decay and cfg.crop_margin == 0.2
    with pytest.raises(SettingsError, match="setting epochs: expected an integer"):
        parse_params({**params, "epochs": "2.5"})


def test_an_old_models_spec_takes_what_it_was_preprocessed_with():
    from melanoma.classifier.preprocessing import LEGACY_PREPROCESS, PreprocessSpec

    spec = PreprocessSpec.from_dict({"img_size": 64, "channels": 3})  # logged before the lesion crop existed
    assert spec.crop_lesion is False and spec.crop_margin == LEGACY_PREPROCESS["crop_margin"]
    assert PreprocessSpec().crop_lesion is True  # today's default, which the old model never saw


def test_a_checkpoints_settings_are_read_as_a_runs_params_are():
    from melanoma.checkpoint import config_of

    cfg = TrainConfig(model="cnn", tta="flip", external="")
    assert config_of({"config": settings_params(cfg)}) == cfg
