"""`mrcnn weights fetch|inspect`: download pretrained weights, or compare a local file, with
the model a config builds. Registered by `trainer.cli.main`; handlers import the library lazily."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from trainer.cli.options import config_arguments, load_config, print_json
from trainer.errors import UserError


def add_weights(commands: argparse._SubParsersAction) -> None:
    weights = commands.add_parser("weights", help="fetch and inspect pretrained weights")
    actions = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch",
        help="download weights and check them against the configured model",
        description="Downloads SOURCE (gs://BUCKET/KEY, https://URL, a path, or 'none' for "
        "random initialisation), checks its layers against the model --config builds, and "
        "moves it to --out only if it fits; a failed fetch leaves --out as it was. The report "
        "goes to --report (default: --out with .report.json appended).",
    )
    fetch.add_argument("source", metavar="SOURCE")
    fetch.add_argument("--out", required=True, help="weights file to write (local)")
    fetch.add_argument("--sha256", metavar="HEX", help="expected sha256 of the file")
    fetch.add_argument("--report", help="where the JSON report goes (default: OUT.report.json)")
    fetch.add_argument("--cache-dir", help="download cache (default $MRCNN_CACHE_DIR or "
                       "~/.cache/mrcnn)")
    inspect = actions.add_parser(
        "inspect",
        help="compare a local weights file with the configured model",
        description="Prints how the file's layers map onto the model; exits 2 when layers "
        "outside --exclude do not fit.",
    )
    inspect.add_argument("path", metavar="PATH")
    for action, config_required in ((fetch, False), (inspect, True)):
        config_arguments(action, required=config_required)
        action.add_argument("--exclude", nargs="+", action="extend", default=[],
                            metavar="LAYER", help="layers not to load, e.g. mrcnn_class_logits "
                            "mrcnn_bbox_fc mrcnn_bbox mrcnn_mask for another NUM_CLASSES")
        action.add_argument("--min-matched-fraction", type=float, default=0.5,
                            help="least share of the model's layers the file must fill (0.5)")
        action.add_argument("--json", action="store_true", help="print the report as JSON")
    fetch.set_defaults(handler=_weights_fetch)
    inspect.set_defaults(handler=_weights_inspect)


def _weights_progress(source: str) -> Callable[[int, int | None], None]:
    """Prints download progress on stderr at most once a second, and when complete."""
    import time

    next_print = [0.0]

    def show(done: int, total: int | None) -> None:
        complete = total is not None and done >= total
        if time.monotonic() < next_print[0] and not complete:
            return
        next_print[0] = time.monotonic() + 1.0
        share = f" of {total / 1e6:.1f} MB ({100 * done // max(total, 1)}%)" if total else " MB"
        tail = ", checking its layers against the model" if complete else ""
        print(f"downloading {source}: {done / 1e6:.1f}{share}{tail}", file=sys.stderr,
              flush=True)

    return show


def _weights_fetch(args: argparse.Namespace) -> int:
    from trainer.weights.fetch import fetch_weights

    report = fetch_weights(
        args.source, args.out, sha256=args.sha256, config=load_config(args),
        exclude=args.exclude, min_matched_fraction=args.min_matched_fraction,
        cache_dir=args.cache_dir, progress=_weights_progress(args.source),
        report_path=args.report)
    if args.json:
        print_json(report)
    elif report["initialisation"] == "random":
        print("no weights: training starts from random initialisation")
    else:
        counts = report["counts"]
        print(f"fetched {report['source']} -> {report['out']} ({report['bytes'] / 1e6:.1f} MB, "
              f"sha256 {report['sha256']}): {counts['matched']} of {counts['model_layers']} "
              f"layers match, {counts['excluded']} excluded, {counts['missing']} missing")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _weights_inspect(args: argparse.Namespace) -> int:
    from trainer.weights.by_name import format_report, parse_exclude
    from trainer.weights.fetch import check_fit, inspect_file

    exclude = parse_exclude(args.exclude)
    inspection = inspect_file(args.path, load_config(args), exclude)
    try:
        check_fit(inspection, exclude=exclude, min_matched_fraction=args.min_matched_fraction)
        error = None
    except UserError as err:
        error = err
    if args.json:
        print_json({"path": args.path, **inspection.summary(), "ok": error is None,
                     "error": None if error is None else str(error)})
    else:
        print(format_report(inspection.report))
    sys.stdout.flush()
    if error is not None:
        raise error  # after the report: exit 2 with the one-line reason
    return 0
