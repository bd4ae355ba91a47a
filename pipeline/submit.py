"""Compile the pipeline, and start or schedule it on a Kubeflow Pipelines API (kfp.Client).

    compile_pipeline()                               # rewrites pipeline/mask_rcnn_pipeline.yaml
    submit("http://localhost:8888", params={"total_epochs": 20})
    schedule("http://localhost:8888", "0 3 * * 0", name="weekly-retrain")

Parameter values come, strongest first, from `params` (`--param NAME=VALUE`), from the
environment the ConfigMap mask-rcnn-pipeline-config gives the retraining CronJob
(ENV_PARAMETERS: CONFIG_PRESET, WEIGHTS_SOURCE, WEIGHTS_SHA256, DATASET_SOURCE, ...; an empty
value is not sent), then from the package's defaults.
PIPELINE_ROOT and PIPELINE_SERVICE_ACCOUNT set where and as whom the run executes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from kfp import compiler

from pipeline.params import (
    PACKAGE,
    package_parameters,
    parse_params,
    typed_value,
    with_local_preset,
)
from pipeline.pipeline import mask_rcnn_pipeline
from trainer.errors import UserError

ENV_PARAMETERS = {
    "CONFIG_PRESET": "config_preset",
    "WEIGHTS_SOURCE": "weights_source",
    "WEIGHTS_SHA256": "weights_sha256",
    "DATASET_SOURCE": "dataset_source",
    "HEADS_EPOCHS": "heads_epochs",
    "TOTAL_EPOCHS": "total_epochs",
    "MLFLOW_EXPERIMENT_NAME": "mlflow_experiment",
    "REGISTERED_MODEL_NAME": "registered_model_name",
    "MIN_MAP": "min_map",
}
KFP_EXPERIMENT = "mask-rcnn"


def compile_pipeline(path: str | Path = PACKAGE) -> Path:
    """Compiles the pipeline into `path` (the committed package by default)."""
    compiler.Compiler().compile(mask_rcnn_pipeline, str(path))
    return Path(path)


def run_arguments(package: str | Path, params: Sequence[str] = (),
                  environ: Mapping[str, str] | None = None) -> dict:
    """The arguments to start the package with: `params` (NAME=VALUE), then the ConfigMap's
    environment variables, then the package's defaults (not sent)."""
    environ = os.environ if environ is None else environ
    kinds = package_parameters(package)
    from_env = {name: typed_value(name, environ[env_name], kinds[name])
                for env_name, name in ENV_PARAMETERS.items() if environ.get(env_name)}
    return with_local_preset({**from_env, **parse_params(params, package)})


def _client(host: str, namespace: str | None):
    import warnings

    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2+"
        return kfp.Client(host=host, namespace=namespace or "kubeflow")


def submit(host: str, *, package: str | Path = PACKAGE, params: Sequence[str] = (),
           run_name: str | None = None, experiment: str = KFP_EXPERIMENT,
           namespace: str | None = None) -> dict:
    """Starts one run; returns its id and the arguments sent."""
    arguments = run_arguments(package, params)
    client = _client(host, namespace)
    result = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
        namespace=namespace, pipeline_root=os.environ.get("PIPELINE_ROOT") or None,
        service_account=os.environ.get("PIPELINE_SERVICE_ACCOUNT") or None)
    return {"run_id": result.run_id, "arguments": _shown(arguments)}


def schedule(host: str, cron: str, *, name: str = "mask-rcnn-retrain",
             package: str | Path = PACKAGE, params: Sequence[str] = (),
             experiment: str = KFP_EXPERIMENT, namespace: str | None = None,
             max_concurrency: int = 1) -> dict:
    """Creates a KFP recurring run. `cron`: five fields (minute hour day month weekday, UTC)
    or KFP's six (seconds first)."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise UserError(f"--cron {cron!r}: expected 5 fields (minute hour day month weekday) "
                        "or 6 (seconds first)")
    cron_expression = " ".join(["0", *fields] if len(fields) == 5 else fields)
    arguments = run_arguments(package, params)
    client = _client(host, namespace)
    found = client.create_experiment(experiment, namespace=namespace)
    recurring = client.create_recurring_run(
        experiment_id=found.experiment_id, job_name=name, cron_expression=cron_expression,
        max_concurrency=max_concurrency, no_catchup=True, params=arguments,
        pipeline_package_path=str(package),
        pipeline_root=os.environ.get("PIPELINE_ROOT") or None,
        service_account=os.environ.get("PIPELINE_SERVICE_ACCOUNT") or None)
    return {"recurring_run_id": recurring.recurring_run_id, "cron": cron_expression,
            "arguments": _shown(arguments)}


def _shown(arguments: dict) -> dict:
    """Arguments for printing: a config sent as YAML text is shown by its NAME."""
    shown = dict(arguments)
    if shown.get("config_yaml"):
        shown["config_yaml"] = "<YAML text, NAME=" + str(
            yaml.safe_load(shown["config_yaml"]).get("NAME")) + ">"
    return shown
