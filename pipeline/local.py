"""`mrcnn run`: the whole pipeline on this machine through KFP's local runner.

    summary = run_local("configs/demo.yaml", ["STEPS_PER_EPOCH=5"], "runs/local",
                        {"total_epochs": 2})

Every task runs as a subprocess of this Python (kfp.local.SubprocessRunner(use_venv=False)),
its outputs under `{workdir}/kfp`, checkpoints under `{workdir}/checkpoints`, and MLflow in
`$MLFLOW_TRACKING_URI` or else `sqlite:///{workdir}/mlflow.db` (artifacts in
`{workdir}/mlartifacts`). The config is resolved here and sent as YAML text, so the tasks see
exactly the file and overrides given.
"""

from __future__ import annotations

import datetime
import inspect
import os
import secrets
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from trainer.config import Config
from trainer.errors import UserError
from trainer.tracking import (
    EVALUATION_METRICS,
    RUN_ID_ENV,
    RUN_NAME_ENV,
    STAGE_TAG,
    client_for,
    find_parent_runs,
    local_tracking_uri,
    stage_runs,
)

# What a laptop run uses unless --param says otherwise: random initialisation, generated
# shapes (about 120 of them for evaluation), three epochs at the config's rate then one at a
# tenth (from random initialisation both stages train all layers; the demo preset sets the
# steps), every val image evaluated, and a gate a model that learned nothing fails.
LOCAL_DEFAULTS = {
    "weights_source": "none",
    "dataset_count": 700,
    "dataset_source": "shapes",
    "val_fraction": 0.17,
    "heads_epochs": 3,
    "total_epochs": 4,
    "min_map": 0.3,
    "gate_key": "segm_mAP50",
    "evaluation_limit": 0,
}
STAGES = ("fetch-weights", "prepare-data", "train-heads", "train-all", "evaluate")


def pipeline_parameters() -> dict[str, inspect.Parameter]:
    from pipeline.pipeline import mask_rcnn_pipeline

    return dict(inspect.signature(mask_rcnn_pipeline.pipeline_func).parameters)


def parse_params(assignments: Sequence[str]) -> dict:
    """`["heads_epochs=2", "weights_exclude=[mrcnn_mask]"]` -> typed pipeline arguments (the
    type of each parameter's default; VALUE is YAML for lists)."""
    known = pipeline_parameters()
    params: dict = {}
    for text in assignments:
        name, sep, value = text.partition("=")
        if not sep or name not in known:
            raise UserError(f"--param {text!r}: expected NAME=VALUE with NAME one of "
                            f"{', '.join(known)}")
        kind = type(known[name].default)
        try:
            params[name] = (yaml.safe_load(value) if kind is list else kind(value))
        except (ValueError, yaml.YAMLError):
            raise UserError(f"--param {name}: {value!r} is not a {kind.__name__}") from None
        if kind is list and not isinstance(params[name], list):
            raise UserError(f"--param {name}: {value!r} is not a list (write [a, b])")
    return params


def run_local(config_path: str | Path, overrides: Sequence[str], workdir: str | Path,
              params: Mapping[str, object] | None = None) -> dict:
    """Runs the pipeline; returns {"pipeline_run_id", "tracking_uri", "experiment", "stages":
    [{stage, seconds, metrics}], "workdir"}. Raises UserError naming the failed stage and its
    reason."""
    config = Config.from_yaml(config_path, overrides)  # bad config: one line, before any task
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(workdir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id = f"local-{stamp}-{secrets.token_hex(3)}"
    arguments = {**LOCAL_DEFAULTS, "config": config.to_yaml(), "config_overrides": [],
                 "checkpoint_root": str(workdir / "checkpoints"), "mlflow_tracking_uri": uri,
                 **(params or {})}
    experiment = str(arguments.get("mlflow_experiment") or
                     pipeline_parameters()["mlflow_experiment"].default)
    # The tasks inherit this process's environment: the run id keys their MLflow parent run.
    os.environ[RUN_ID_ENV] = run_id
    os.environ[RUN_NAME_ENV] = f"local {stamp}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from kfp import local

    from pipeline.pipeline import mask_rcnn_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "kfp"), raise_on_error=True)
    with warnings.catch_warnings():
        # kfp.local warns for every task whose image name lacks "python"; ours is the
        # project's image, and these tasks run in this environment on purpose.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            mask_rcnn_pipeline(**arguments)
        except RuntimeError as err:
            raise UserError(failure_reason(uri, experiment, run_id, str(err))) from None
    return {"pipeline_run_id": run_id, "tracking_uri": uri, "experiment": experiment,
            "workdir": str(workdir), "stages": stage_summary(uri, experiment, run_id)}


def failure_reason(uri: str, experiment: str, run_id: str, kfp_message: str) -> str:
    """The failed stage and its reason from MLflow (the stage run's `error` tag), else KFP's."""
    try:
        client = client_for(uri)
        exp = client.get_experiment_by_name(experiment)
        for parent in find_parent_runs(client, exp.experiment_id, run_id)[:1]:
            for run in stage_runs(client, parent.info.run_id, exp.experiment_id):
                if run.info.status == "FAILED":
                    return (f"stage {run.data.tags.get(STAGE_TAG)} failed: "
                            f"{run.data.tags.get('error', 'see its log above')}")
    except Exception:  # noqa: BLE001 - tracking down too: KFP's own message still says which
        pass
    return kfp_message.splitlines()[0]


def stage_summary(uri: str, experiment: str, run_id: str) -> list[dict]:
    """Per stage: wall time and key metrics, read back from the MLflow stage runs."""
    try:
        client = client_for(uri)
        exp = client.get_experiment_by_name(experiment)
        [parent] = find_parent_runs(client, exp.experiment_id, run_id)[:1]
        runs = stage_runs(client, parent.info.run_id, exp.experiment_id)
    except Exception:  # noqa: BLE001 - a summary without MLflow is a warning, not a failure
        return []
    rows = []
    for run in runs:
        metrics = run.data.metrics
        shown: dict[str, str] = {}
        if "loss" in metrics:
            history = client.get_metric_history(run.info.run_id, "loss")
            first, last = history[0].value, history[-1].value
            shown["loss"] = f"{first:.3f} -> {last:.3f}" if len(history) > 1 else f"{last:.3f}"
            if "val_loss" in metrics:
                shown["val_loss"] = f"{metrics['val_loss']:.3f}"
        if "weights_source" in run.data.params:
            shown["weights"] = run.data.params["weights_source"]
        for key in ("train_images", "val_images", "layers_matched",
                    *(k for k in EVALUATION_METRICS if k != "bbox_mAP50"), "gate_passed"):
            if key in metrics:
                shown[key] = f"{metrics[key]:g}" if key.endswith("images") else \
                    f"{metrics[key]:.4f}"
        end = run.info.end_time or run.info.start_time
        rows.append({"stage": run.data.tags.get(STAGE_TAG, run.info.run_name),
                     "seconds": round((end - run.info.start_time) / 1000, 1),
                     "status": run.info.status, "metrics": shown,
                     "run_id": run.info.run_id, "parent_run_id": parent.info.run_id})
    order = {stage: i for i, stage in enumerate(STAGES)}
    return sorted(rows, key=lambda row: order.get(row["stage"], len(order)))


def format_summary(summary: dict) -> str:
    """The table `mrcnn run` prints, and how to look at the results."""
    lines = [f"{'stage':<14} {'time':>7}  key metrics"]
    for row in summary["stages"]:
        metrics = ", ".join(f"{k} {v}" for k, v in row["metrics"].items())
        lines.append(f"{row['stage']:<14} {row['seconds']:>6.0f}s  {metrics}")
    if not summary["stages"]:
        lines.append("(no stage runs in MLflow: see the tracking errors above)")
    uri = summary["tracking_uri"]
    lines.append("")
    lines.append(f"MLflow: experiment {summary['experiment']!r}, pipeline run "
                 f"{summary['pipeline_run_id']} at {uri}")
    if uri.startswith("sqlite:///"):
        lines.append(f"  open the UI: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000"
                     "   then http://127.0.0.1:5000")
    else:
        lines.append(f"  open the UI: {uri}")
    lines.append(f"KFP task outputs: {summary['workdir']}/kfp; checkpoints: "
                 f"{summary['workdir']}/checkpoints")
    return "\n".join(lines)
