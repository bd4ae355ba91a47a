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
import os
import secrets
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from kfp import local

from pipeline.pipeline import mask_rcnn_pipeline
from trainer.config import Config
from trainer.errors import UserError
from trainer.stages.tracking import (
    DEFAULT_EXPERIMENT,
    RUN_ID_ENV,
    RUN_NAME_ENV,
    local_tracking_uri,
    pipeline_failure,
    pipeline_summary,
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
    # On a laptop the checkpoints stay (runs/local/checkpoints: `mrcnn export --weights last`,
    # resuming by hand); `--param keep_checkpoints=false` removes them as a cluster run does.
    "keep_checkpoints": True,
}


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
    arguments = {**LOCAL_DEFAULTS, "config_preset": str(config_path),
                 "config_yaml": config.to_yaml(), "config_overrides": [],
                 "checkpoint_root": str(workdir / "checkpoints"), "mlflow_tracking_uri": uri,
                 **(params or {})}
    experiment = str(arguments.get("mlflow_experiment") or DEFAULT_EXPERIMENT)
    # The tasks inherit this process's environment: the run id keys their MLflow parent run,
    # and the cached tasks (which get no MLflow parameters) record failures where it says.
    os.environ[RUN_ID_ENV] = run_id
    os.environ["MLFLOW_TRACKING_URI"] = str(arguments["mlflow_tracking_uri"] or uri)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    os.environ[RUN_NAME_ENV] = f"local {stamp}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "kfp"), raise_on_error=True)
    with warnings.catch_warnings():
        # kfp.local warns for every task whose image name lacks "python"; ours is the
        # project's image, and these tasks run in this environment on purpose.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            mask_rcnn_pipeline(**arguments)
        except RuntimeError as err:
            raise UserError(pipeline_failure(uri, experiment, run_id, str(err))) from None
    return {"pipeline_run_id": run_id, "tracking_uri": uri, "experiment": experiment,
            "workdir": str(workdir), "stages": pipeline_summary(uri, experiment, run_id)}


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
