"""The ``melanoma`` command: train, search, crossval, adapt, ensemble, register, evaluate, predict, app, card, audit, bench, demo-data.

Thin: parse arguments, call the library, print results, choose the exit code. Libraries are
imported by the command that needs them, so ``melanoma --help`` starts without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from melanoma.config import (
    DEFAULT_ALIAS,
    REGISTERED_MODEL,
    AdaptSettings,
    CrossvalSettings,
    EnsembleSettings,
    SearchSettings,
    TrainConfig,
    add_config_arguments,
    config_from_args,
)


def use_default_experiment(name: str) -> None:
    """Put runs in ``name`` unless `mlflow run` or the environment already chose an experiment."""
    import mlflow

    if not {"MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"} & set(os.environ):
        mlflow.set_experiment(name)


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends a run as Ctrl-C does: KILLED, checkpoint kept."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def label_project_stub(resumed: str) -> None:
    """`mlflow run -P resume=ID` opens a run of its own before this code starts; training goes on
    in ID, so that run only gets a note pointing there (`mlflow run --run-id ID -P resume=ID`
    opens none)."""
    import mlflow

    stub = os.environ.pop("MLFLOW_RUN_ID", None)
    if stub and stub != resumed:
        client = mlflow.MlflowClient()
        for key, value in {"resumed_run": resumed, "mlflow.runName": f"resume of {resumed}",
                           "mlflow.note.content": f"This run only started the resumption of run {resumed}; "
                                                  f"training went on there."}.items():
            client.set_tag(stub, key, value)


def cmd_train(args: argparse.Namespace) -> int:
    import mlflow

    from melanoma.checkpoint import config_of, load_run_checkpoint
    from melanoma.workflows.training import run_training

    resume = load_run_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        cfg = config_of(resume)  # the run's own settings: the command line's are ignored
        label_project_stub(args.resume)
        run = mlflow.start_run(run_id=args.resume)
    else:
        cfg = config_from_args(args)
        use_default_experiment(args.experiment)
        run = mlflow.start_run(run_name=args.run_name)
    run_id = run.info.run_id
    interrupt_on_sigterm()
    try:
        summary = run_training(cfg, resume=resume).summary
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        print(f"interrupted: run {run_id} is KILLED with its last checkpoint kept; continue it with "
              f"`melanoma train --resume {run_id}`", file=sys.stderr)
        return 130
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()
    print(json.dumps({"run_id": run_id, **summary}, indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from melanoma.workflows.search import search_from_args

    use_default_experiment(args.experiment)
    print(json.dumps(search_from_args(args), indent=2))
    return 0


def cmd_crossval(args: argparse.Namespace) -> int:
    import mlflow

    from melanoma.config import CrossvalSettings
    from melanoma.workflows.crossval import run_crossval

    cfg, settings = config_from_args(args), config_from_args(args, CrossvalSettings)
    use_default_experiment(args.experiment)
    with mlflow.start_run(run_name=args.run_name or "crossval") as run:
        summary = run_crossval(cfg, settings)
    print(json.dumps({"run_id": run.info.run_id, **summary}, indent=2))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    import mlflow

    from melanoma.config import AdaptSettings
    from melanoma.workflows.adapt import run_adaptation

    settings = config_from_args(args, AdaptSettings)
    use_default_experiment(args.experiment)
    with mlflow.start_run(run_name=args.run_name or f"adapt-{settings.site}") as run:
        summary = run_adaptation(settings)
    print(json.dumps({"run_id": run.info.run_id, **summary}, indent=2))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    import mlflow

    from melanoma.workflows.ensemble import run_ensemble

    settings = config_from_args(args, EnsembleSettings)
    use_default_experiment(args.experiment)
    with mlflow.start_run(run_name=args.run_name or "ensemble") as run:
        summary = run_ensemble(settings)
    print(json.dumps({"run_id": run.info.run_id, **summary}, indent=2))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from melanoma.tracking import register_run_model

    version = register_run_model(args.run_id, args.name, args.alias or None)
    alias = f"@{args.alias}" if args.alias else ""
    print(f"registered models:/{args.name}/{version.version} {alias}".strip())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from melanoma.workflows.evaluation import evaluate_model_on_folder

    use_default_experiment(args.experiment)
    metrics = evaluate_model_on_folder(args.model, args.data, args.name)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from melanoma.batch import predict_files

    counts = predict_files(args.model, args.paths, args.out, args.explain, args.chunk_size)
    print(json.dumps({"out": str(args.out), **counts}, indent=2))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from melanoma.app import serve_app

    serve_app(args.model, args.host, args.port)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from melanoma.card import write_card

    text = write_card(args.run)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from melanoma.audit import audit_dataset, write_report

    report = audit_dataset(args.data, img_size=args.img_size, seed=args.seed, label_map=args.label_map)
    paths = write_report(report, args.out, args.report)
    print(report["verdict"])
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))
    print("report: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from melanoma.bench import run_benchmark

    run_benchmark(args.data, args.out, steps=args.steps, serve=args.serve, tricks=args.tricks)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from melanoma.data.demo import make_demo_dataset

    root = make_demo_dataset(args.out, per_class=args.per_class, seed=args.seed, size=args.size)
    print(f"wrote a synthetic Kaggle-layout dataset to {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melanoma", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one model and log it to MLflow")
    add_config_arguments(train)
    train.add_argument("--experiment", default="melanoma", help="MLflow experiment (outside `mlflow run`)")
    train.add_argument("--run-name", default=None)
    train.add_argument("--resume", default="", metavar="RUN_ID",
                       help="continue this killed run from its last checkpoint, with its own settings")
    train.set_defaults(func=cmd_train)

    search = sub.add_parser("search", help="Optuna search over training settings, best model registered")
    add_config_arguments(search)
    add_config_arguments(search, SearchSettings())
    search.add_argument("--experiment", default="melanoma", help="MLflow experiment (outside `mlflow run`)")
    search.set_defaults(func=cmd_search)

    crossval = sub.add_parser("crossval", help="leave each source out in turn; a model with a threshold that travels")
    add_config_arguments(crossval)
    add_config_arguments(crossval, CrossvalSettings())
    crossval.add_argument("--experiment", default="melanoma", help="MLflow experiment (outside `mlflow run`)")
    crossval.add_argument("--run-name", default=None)
    crossval.set_defaults(func=cmd_crossval)

    adapt = sub.add_parser("adapt", help="validate a model on a site's photos, set its operating point, register it")
    add_config_arguments(adapt, AdaptSettings())
    adapt.add_argument("--experiment", default="melanoma-adaptation", help="MLflow experiment (outside `mlflow run`)")
    adapt.add_argument("--run-name", default=None)
    adapt.set_defaults(func=cmd_adapt)

    ensemble = sub.add_parser("ensemble", help="average finished training runs into one logged (and registered) model")
    add_config_arguments(ensemble, EnsembleSettings())
    ensemble.add_argument("--experiment", default="melanoma", help="MLflow experiment (outside `mlflow run`)")
    ensemble.add_argument("--run-name", default=None)
    ensemble.set_defaults(func=cmd_ensemble)

    register = sub.add_parser("register", help="register a training run's model and set an alias")
    register.add_argument("--run-id", required=True)
    register.add_argument("--name", default=REGISTERED_MODEL)
    register.add_argument("--alias", default=DEFAULT_ALIAS, help="alias to move to the new version ('' for none)")
    register.set_defaults(func=cmd_register)

    evaluate = sub.add_parser("evaluate", help="score a folder through a logged model, as a client would")
    evaluate.add_argument("--model", required=True, help="model URI, e.g. models:/melanoma-classifier@champion")
    evaluate.add_argument("--data", required=True, help="Kaggle layout, benign/ + malignant/, or one class folder")
    evaluate.add_argument("--name", default=None, help="name of the set in metric names (default: folder name)")
    evaluate.add_argument("--experiment", default="melanoma-evaluation")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="score image files, folders or CSVs of paths into a CSV")
    predict.add_argument("paths", nargs="+", type=Path, help="image files, folders (recursive) or .csv files of paths")
    predict.add_argument("--model", required=True, help="model URI, e.g. models:/melanoma-classifier@champion")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"),
                         help="output CSV; rerunning skips the paths already in it")
    predict.add_argument("--explain", type=Path, default=None, metavar="DIR",
                         help="also write original | Grad-CAM overlay images here")
    predict.add_argument("--chunk-size", type=int, default=32, help="images per model call")
    predict.set_defaults(func=cmd_predict)

    app = sub.add_parser("app", help="a web page to try a logged model on a photo")
    app.add_argument("--model", required=True, help="model URI, e.g. models:/melanoma-classifier@champion")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=int, default=5002)
    app.set_defaults(func=cmd_app)

    card = sub.add_parser("card", help="write a run's model card again (and its registered versions' descriptions)")
    card.add_argument("run", help="training run id, runs:/ID/model or models:/NAME@ALIAS")
    card.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    card.set_defaults(func=cmd_card)

    audit = sub.add_parser("audit", help="duplicates, background-only probe and image statistics")
    audit.add_argument("--data", required=True, help="one dataset or several, comma-separated (as train takes them)")
    audit.add_argument("--label_map", default=TrainConfig.label_map, help="metadata layout: diagnosis -> class")
    audit.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    audit.add_argument("--report", type=Path, default=Path("audit.png"), help="the figure")
    audit.add_argument("--img-size", type=int, default=64)
    audit.add_argument("--seed", type=int, default=0)
    audit.set_defaults(func=cmd_audit)

    bench = sub.add_parser("bench", help="measure decode, cache, training and prediction speed")
    bench.add_argument("--data", default=None, help="dataset folder (default: the demo set)")
    bench.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    bench.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    bench.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                       help="also time HTTP requests against `mlflow models serve`")
    bench.add_argument("--tricks", action="store_true",
                       help="also time each speed trick against plain PyTorch, interleaved")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo-data", help="write the synthetic demo dataset to a folder")
    demo.add_argument("out", type=Path)
    demo.add_argument("--per-class", type=int, default=TrainConfig.demo_size)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=128)
    demo.set_defaults(func=cmd_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mlflow.exceptions import MlflowException

    from melanoma.checkpoint import CheckpointError
    from melanoma.classifier.errors import SettingsError
    from melanoma.classifier.models import PretrainedWeightsError
    from melanoma.classifier.preprocessing import InvalidImageError
    from melanoma.data.records import DataError

    try:
        return args.func(args)
    except (SettingsError, DataError, InvalidImageError, PretrainedWeightsError, CheckpointError, FileNotFoundError,
            MlflowException) as exc:  # the user's input: one line; anything else is a bug and keeps its traceback
        if args.verbose:
            logging.exception("error")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
