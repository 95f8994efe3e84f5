from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from melanoma.config import AdaptSettings, CrossvalSettings, EnsembleSettings, SearchSettings, TrainConfig, parse_bool

ROOT = Path(__file__).resolve().parents[1]


def mlflow_default(value):
    """A setting's default as MLproject writes it (booleans as lower-case strings)."""
    return str(value).lower() if isinstance(value, bool) else value


@pytest.mark.parametrize("entry, settings, extra", [
    ("main", (TrainConfig(),), {"resume"}),
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
    from melanoma.data.preprocessing import PreprocessSpec

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


def test_a_runs_settings_come_back_from_its_params():
    from melanoma.config import config_from_params

    cfg = TrainConfig(model="cnn", epochs=5, crop_lesion=False, lr=3e-4, external="a,b", tta="flip")
    assert config_from_params(cfg.to_params()) == cfg
