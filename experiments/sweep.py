"""Screen training settings quickly: train each, print and save validation and external figures.

Every setting is a list of overrides of the common flags, e.g. ``"img_size=128 model=resnet18"``.
Each one is trained with ``fit`` on the same validation split that ``melanoma train`` carves, its
operating threshold is chosen on validation for ``target_sensitivity``, and every ``external``
folder is scored at that threshold. Nothing is logged to MLflow, so it runs
on a rented GPU without a tracking server; confirm the winner with ``melanoma train``, which logs
everything.

    python -m experiments.sweep --data DIR --external DIR --out sweep.json "" "img_size=128" ...

The JSON is rewritten after every setting, so a sweep cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

from melanoma.classifier.calibration import Calibration
from melanoma.classifier.engine import TorchEngine
from melanoma.classifier.inference import Scorer, predict_proba, select_device
from melanoma.classifier.models import build_model
from melanoma.config import TrainConfig, add_config_arguments, config_from_args, parse_bool
from melanoma.data.training_data import load_data
from melanoma.evaluate import classification_metrics, external_names, operating_point, score_folder
from melanoma.train import fit_data

log = logging.getLogger("melanoma.sweep")


def apply_overrides(base: TrainConfig, text: str) -> TrainConfig:
    """``base`` with the ``key=value`` pairs of ``text`` (space-separated) applied and validated."""
    kinds = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"bad setting {pair!r}: expected key=value with key one of {sorted(kinds)}")
        changes[key] = parse_bool(value) if kinds[key] is bool else kinds[key](value)
    cfg = dataclasses.replace(base, **changes)
    cfg.validate()
    return cfg


def screen(cfg: TrainConfig) -> dict[str, float]:
    """Train one setting and return its validation and external figures."""
    device = select_device()
    spec = cfg.preprocess_spec()
    run_data = load_data(cfg, spec)
    model = build_model(cfg.model, cfg.channels, cfg.pretrained, cfg.drop_path)
    start = time.perf_counter()
    result = fit_data(model, run_data, spec, cfg, device)
    minutes = (time.perf_counter() - start) / 60
    val_labels = run_data.data.labels[run_data.val_idx]
    val_probs = predict_proba(model, run_data.data.images[run_data.val_idx], spec, device, tta=cfg.tta)
    point = operating_point(val_labels, val_probs, cfg.target_sensitivity)
    row = {"device": device.type, "minutes": minutes, "best_epoch": result.best_epoch, "threshold": point.threshold,
           "train_images_per_s": statistics.median(h["train_images_per_s"] for h in result.history)}
    row.update({f"val_{k}": v for k, v in classification_metrics(val_labels, val_probs).items()})
    row["val_op_specificity"] = point.metrics["specificity"]
    for name, folder in external_names(cfg.external_dirs).items():
        external, logits = score_folder(TorchEngine(Scorer(model, spec, cfg.tta), device), folder, spec)
        probs = Calibration().probabilities(logits)
        row.update({f"external_{name}_{k}": v for k, v in classification_metrics(external.labels, probs, point.threshold).items()})
        row[f"external_{name}_mean_malignant_probability"] = float(probs.mean())
        row[f"external_{name}_count"] = len(probs)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("sweep.json"), help="JSON with one row per setting")
    parser.add_argument("settings", nargs="+", help='overrides per setting, e.g. "img_size=128 augment=full"; '
                                                    '"" trains the flags as given')
    args = parser.parse_args(argv)
    base = config_from_args(args)
    configs = [apply_overrides(base, text) for text in args.settings]  # all checked before any training
    rows = []
    for text, cfg in zip(args.settings, configs):
        log.info("setting %r", text)
        row = {"setting": text, **screen(cfg)}
        rows.append(row)
        args.out.write_text(json.dumps(rows, indent=2))
        external = {k: round(v, 3) for k, v in row.items() if k.startswith("external_") and k.endswith("specificity")}
        print(f"{text or '(flags)':40s} val acc {row['val_accuracy']:.3f} auc {row['val_auc']:.3f} "
              f"op spec {row['val_op_specificity']:.3f} {external} {row['minutes']:.1f} min "
              f"{row['train_images_per_s']:.0f} img/s", flush=True)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
