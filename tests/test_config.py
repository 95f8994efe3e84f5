from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from melanoma.config import TrainConfig, parse_bool

ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_main_parameters_match_the_settings_object():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    main = project["entry_points"]["main"]
    cfg = TrainConfig()
    assert set(main["parameters"]) == {f.name for f in fields(TrainConfig)} | {"resume"}
    assert "--resume {resume}" in main["command"]
    for name, spec in {k: v for k, v in main["parameters"].items() if k != "resume"}.items():
        default = getattr(cfg, name)
        expected = str(default).lower() if isinstance(default, bool) else default
        assert spec["default"] == expected, name
        assert f"--{name} {{{name}}}" in main["command"]


def test_mlproject_search_takes_the_settings_and_search_parameters():
    search = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["search"]
    required = {"model", "data", "n_trials", "timeout", "epochs", "img_size", "channels", "storage",
                "study_name", "registered_model", "alias"}
    assert required <= set(search["parameters"])
    cfg, settings = TrainConfig(), {f.name for f in fields(TrainConfig)}
    for name, spec in search["parameters"].items():
        assert f"{{{name}}}" in search["command"]
        if name in settings:  # the search starts from main's defaults
            default = getattr(cfg, name)
            assert spec["default"] == (str(default).lower() if isinstance(default, bool) else default), name


@pytest.mark.parametrize("field, value, message", [
    ("model", "vgg", "unknown model"),
    ("wise_alpha", 0.5, "needs a model with pretrained weights"),
    ("freeze_epochs", 10, "must be below epochs"),
    ("drop_path", 0.1, "drop_path is for timm models"),
    ("channels", 2, "channels must be 1"),
    ("lr", 0.0, "lr must be positive"),
    ("img_size", 8, "img_size"),
    ("val_fraction", 1.5, "val_fraction"),
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
