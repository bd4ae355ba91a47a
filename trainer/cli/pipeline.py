"""`mrcnn pipeline compile|submit|schedule`: the Kubeflow pipeline package and its runs.
Registered by `trainer.cli.main`; handlers import the library lazily."""

from __future__ import annotations

import argparse

from trainer.cli.options import print_json


def add_pipeline(commands: argparse._SubParsersAction) -> None:
    pipeline = commands.add_parser("pipeline", help="compile, submit or schedule the "
                                   "Kubeflow pipeline")
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    compile_ = actions.add_parser("compile", help="rewrite pipeline/mask_rcnn_pipeline.yaml",
                                  description="Compiles pipeline/pipeline.py into the "
                                  "committed package (or --out).")
    compile_.add_argument("--out", help="write here instead of the committed package")
    compile_.set_defaults(handler=_pipeline_compile)
    submit = actions.add_parser(
        "submit", help="start a run on a Kubeflow Pipelines API",
        description="Parameters: --param, then the ConfigMap's environment (CONFIG_PRESET, "
        "WEIGHTS_SOURCE, DATASET_SOURCE, HEADS_EPOCHS, TOTAL_EPOCHS, ...), then the package's "
        "defaults. PIPELINE_ROOT and PIPELINE_SERVICE_ACCOUNT apply when set.")
    schedule = actions.add_parser(
        "schedule", help="create a KFP recurring run (scheduled retraining)",
        description="A recurring run of the package on a cron schedule (UTC), one run at a "
        "time, no catch-up. Use it or the k8s CronJob, not both.")
    schedule.add_argument("--cron", required=True, help="'minute hour day month weekday', "
                          "e.g. '0 3 * * 0' (Sundays 03:00)")
    schedule.add_argument("--name", default="mask-rcnn-retrain", help="recurring run name")
    submit.add_argument("--run-name", help="the run's name in the KFP UI")
    for action in (submit, schedule):
        action.add_argument("--host", required=True, help="KFP API, e.g. http://localhost:8888")
        action.add_argument("--package", help="compiled pipeline (default: the committed one)")
        action.add_argument("--param", dest="params", action="append", default=[],
                            metavar="NAME=VALUE", help="a pipeline parameter (repeatable)")
        action.add_argument("--experiment", default="mask-rcnn", help="KFP experiment")
        action.add_argument("--namespace", help="KFP namespace (multi-user Kubeflow)")
        action.add_argument("--json", action="store_true", help="print the result as JSON")
    submit.set_defaults(handler=_pipeline_submit)
    schedule.set_defaults(handler=_pipeline_schedule)


def _pipeline_compile(args: argparse.Namespace) -> int:
    from pipeline.params import PACKAGE
    from pipeline.submit import compile_pipeline

    print(f"compiled {compile_pipeline(args.out or PACKAGE)}")
    return 0


def _pipeline_submit(args: argparse.Namespace) -> int:
    from pipeline.params import PACKAGE
    from pipeline.submit import submit

    result = submit(args.host, package=args.package or PACKAGE, params=args.params,
                    run_name=args.run_name, experiment=args.experiment,
                    namespace=args.namespace)
    if args.json:
        print_json(result)
    else:
        print(f"started run {result['run_id']} on {args.host} with {result['arguments']}")
    return 0


def _pipeline_schedule(args: argparse.Namespace) -> int:
    from pipeline.params import PACKAGE
    from pipeline.submit import schedule

    result = schedule(args.host, args.cron, name=args.name, package=args.package or PACKAGE,
                      params=args.params, experiment=args.experiment,
                      namespace=args.namespace)
    if args.json:
        print_json(result)
    else:
        print(f"scheduled {args.name} ({result['recurring_run_id']}) at '{result['cron']}' "
              f"on {args.host}")
    return 0
