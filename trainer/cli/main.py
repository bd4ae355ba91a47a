"""`mrcnn`: the command line. Thin: it parses arguments and calls one library function each.

Every command exits non-zero with a one-line reason on bad input (`UserError` and its kin),
prints progress for long work, and writes JSON where asked with `--json`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from trainer.cli.options import config_arguments, load_config, print_json
from trainer.cli.pipeline import add_pipeline
from trainer.cli.weights import add_weights
from trainer.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

Handler = Callable[[argparse.Namespace], int]


# === Commands ===
# Each `_add_*` function registers one subcommand; its handler imports the library lazily so
# that `mrcnn --help` stays fast and a command never pays for another's imports.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrcnn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands)
    return parser


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare datasets as TFRecord shards")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare",
        help="synthetic shapes or a COCO dataset -> TFRecord shards + dataset.json",
        description="Writes {split}-NNNNN-of-NNNNN.tfrecord shards, dataset.json and "
        "val_annotations.json into --out (replaced only when complete).",
    )
    prepare.add_argument("--source", choices=("shapes", "coco"), default="shapes")
    prepare.add_argument("--out", required=True, help="output folder (local)")
    prepare.add_argument("--annotations", help="coco: instances JSON (path or gs://)")
    prepare.add_argument("--images", help="coco: images folder (path or gs://bucket/prefix)")
    prepare.add_argument("--count", type=int, help="shapes: images to generate (default "
                         "500); coco: read at most this many images")
    prepare.add_argument("--image-size", type=int, help="shapes: image side in px (128)")
    prepare.add_argument("--val-fraction", type=float, default=0.1)
    prepare.add_argument("--shards", type=int, default=4, help="train shards (default 4)")
    prepare.add_argument("--workers", type=int, help="encoding processes (default: CPUs)")
    prepare.add_argument("--categories", nargs="+", metavar="NAME",
                         help="keep only these category names")
    prepare.add_argument("--seed", type=int, default=0, help="shapes seed and split salt")
    prepare.add_argument("--json", action="store_true", help="print the summary as JSON")
    prepare.set_defaults(handler=_data_prepare)


def _data_prepare(args: argparse.Namespace) -> int:
    from trainer.data.prepare import prepare_dataset

    summary = prepare_dataset(
        args.source, args.out, annotations=args.annotations, images=args.images,
        count=args.count, image_size=args.image_size, val_fraction=args.val_fraction,
        shards=args.shards, workers=args.workers, categories=args.categories, seed=args.seed,
    )
    if args.json:
        print_json(summary)
    else:
        splits = ", ".join(f"{name} {s['images']}" for name, s in summary["splits"].items())
        skipped = sum(summary["skipped_counts"].values())
        print(f"prepared {summary['out_dir']}: {splits} images, {skipped} records skipped, "
              f"{sum(summary['repaired_counts'].values())} repaired "
              f"({summary['images_per_second']} images/s)")
    return 0


_COMMANDS.append(_add_data)


_COMMANDS.append(add_weights)  # defined in trainer.cli.weights


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="COCO bbox/segm AP and VOC mAP@0.5 of weights on the val split",
        description="Runs the inference model on the val shards of --data; writes "
        "metrics.json, report.md and pictures/*.png into --out. Exits 0 when the gate fails "
        "(the result says so) unless --fail-on-gate.",
    )
    config_arguments(evaluate)
    evaluate.add_argument("--weights", required=True,
                          help="a .h5 file, or 'last': the newest checkpoint in --model-dir")
    evaluate.add_argument("--model-dir", default="runs", help="where 'last' looks (runs)")
    evaluate.add_argument("--data", required=True, help="prepared dataset folder (local)")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N val images")
    evaluate.add_argument("--min-map", type=float, help="quality gate: pass when the gate "
                          "metric is at least this")
    evaluate.add_argument("--gate-key", default="segm_mAP", help="gate metric (segm_mAP)")
    evaluate.add_argument("--pictures", type=int, default=4, help="pictures to draw (4)")
    evaluate.add_argument("--fail-on-gate", action="store_true",
                          help="exit 1 when the gate fails")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluation.run import evaluate

    config = load_config(args)
    result = evaluate(config, args.weights, args.data, args.out, limit=args.limit,
                      min_map=args.min_map, gate_key=args.gate_key,
                      num_pictures=args.pictures, model_dir=args.model_dir)
    verdict = result["gate"]
    if args.json:
        print_json(result)
    else:
        shown = ", ".join(
            f"{key} {'n/a' if result[key] is None else format(result[key], '.4f')}"
            for key in ("bbox_mAP", "bbox_mAP50", "segm_mAP", "segm_mAP50", "voc_mAP50"))
        threshold = verdict["threshold"]
        outcome = ("passed" if verdict["passed"] else "FAILED") + (
            "" if threshold is None else f" ({verdict['key']} >= {threshold})")
        print(f"evaluated {result['num_images']} images, {result['num_detections']} "
              f"detections ({result['images_per_second']} images/s): {shown}; gate {outcome}; "
              f"report in {args.out}")
    return 1 if args.fail_on_gate and not verdict["passed"] else 0


_COMMANDS.append(_add_evaluate)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train one stage (heads, 3+, 4+, 5+, all or a regex) on a prepared dataset",
        description="matterport's train(): --epochs is the epoch to stop at; --init last "
        "resumes the newest checkpoint exactly (weights, optimizer state, epoch).",
    )
    config_arguments(train)
    train.add_argument("--data", required=True, help="prepared dataset folder")
    train.add_argument("--val-data", help="dataset whose val split gives validation losses "
                       "(default: --data)")
    train.add_argument("--init", default="none",
                       help="none (random), last (newest checkpoint in --model-dir) or a .h5 path")
    train.add_argument("--exclude", nargs="*", default=[], metavar="LAYER",
                       help="layers not to load from --init (e.g. the class-specific ones)")
    train.add_argument("--layers", default="heads", help="heads, 3+, 4+, 5+, all, or a regex")
    train.add_argument("--epochs", type=int, required=True, help="the epoch to stop at")
    train.add_argument("--learning-rate", type=float, default=0.0,
                       help="default (0): the config's LEARNING_RATE")
    train.add_argument("--model-dir", default="runs", help="where run folders go (runs)")
    train.add_argument("--keep-last", type=int, metavar="N", help="keep only the newest N "
                       "checkpoints of the run folder (default: keep all, as matterport)")
    train.add_argument("--augmentation", help="augmentation spec: YAML/JSON text or a file")
    train.add_argument("--no-augmentation-sources", nargs="*", default=None, metavar="SOURCE")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from trainer.stages.train import run_training

    config = load_config(args)
    summary = run_training(
        config, args.data, val_data=args.val_data or args.data, init=args.init,
        exclude=args.exclude, layers=args.layers, epochs=args.epochs,
        learning_rate=args.learning_rate, model_dir=args.model_dir,
        augmentation=args.augmentation, no_augmentation_sources=args.no_augmentation_sources,
        verbose=2 if args.json else 1, keep_last=args.keep_last)
    if args.json:
        print_json(summary)
    else:
        print(f"trained {args.layers} to epoch {summary['epoch']}: {summary['checkpoint']}")
    return 0


_COMMANDS.append(_add_train)


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="weights -> a TensorFlow SavedModel for serving (TF Serving, KServe, MLflow)",
        description="Writes a SavedModel whose serving_default signature takes encoded "
        "JPEG/PNG images and returns boxes in image pixels, class ids and names, scores and "
        "per-detection masks (see README, Serving).")
    config_arguments(export)
    export.add_argument("--weights", required=True,
                        help="a .h5 file, or 'last': the newest checkpoint in --model-dir")
    export.add_argument("--model-dir", default="runs", help="where 'last' looks (runs)")
    export.add_argument("--out", required=True, help="SavedModel folder to write")
    names = export.add_mutually_exclusive_group()
    names.add_argument("--data", help="a prepared dataset: class names from its dataset.json")
    names.add_argument("--class-names", nargs="+", metavar="NAME",
                       help="NUM_CLASSES names, background first")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from trainer.data.input import read_dataset_info
    from trainer.engine.export import export_saved_model
    from trainer.evaluation.run import resolve_weights

    config = load_config(args)
    names = args.class_names or (read_dataset_info(args.data)["class_names"] if args.data
                                 else None)
    weights = resolve_weights(args.weights, args.model_dir, config)
    out = export_saved_model(config, weights, args.out, class_names=names)
    print(f"exported {weights} -> {out} (signature serving_default)")
    return 0


_COMMANDS.append(_add_export)


_COMMANDS.append(add_pipeline)  # defined in trainer.cli.pipeline


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="the whole pipeline on this machine (kfp.local) with a local MLflow store",
        description="Runs fetch-weights, prepare-data, train (heads), train (all) and evaluate "
        "as local KFP tasks; MLflow goes to $MLFLOW_TRACKING_URI or WORKDIR/mlflow.db. Prints "
        "a summary and how to open the MLflow UI.")
    run.add_argument("--config", default="configs/demo.yaml", help="YAML preset (demo)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--param", dest="params", action="append", default=[],
                     metavar="NAME=VALUE", help="a pipeline parameter, e.g. total_epochs=4 "
                     "(repeatable)")
    run.add_argument("--workdir", default="runs/local", help="outputs, checkpoints, MLflow "
                     "store (runs/local)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.local import format_summary, run_local
    from pipeline.params import parse_params

    summary = run_local(args.config, args.overrides, args.workdir, parse_params(args.params))
    if args.json:
        print_json(summary)
    else:
        print("\n" + format_summary(summary))
    return 0


_COMMANDS.append(_add_run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    action = getattr(args, f"{args.command}_command", None)
    command = f"mrcnn {args.command}" + (f" {action}" if action else "")
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"{command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno is None:  # not the file system's answer: a bug, keep its traceback
            raise
        # A path that cannot be read or written, a full disk: the user's to fix.
        where = f" ({err.filename})" if err.filename else ""
        print(f"{command}: error: {err.strerror or err}{where}: check the path, its "
              "permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
