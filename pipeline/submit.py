"""Compile the pipeline, and start or schedule it on a Kubeflow Pipelines API (kfp.Client).

    compile_pipeline()                               # rewrites pipeline/mask_rcnn_pipeline.yaml
    submit("http://localhost:8888", params={"total_epochs": 20})
    schedule("http://localhost:8888", "0 3 * * 0", name="weekly-retrain")

Parameter values come, strongest first, from `params` (`--param NAME=VALUE`), from the
environment the ConfigMap mask-rcnn-pipeline-config gives the retraining CronJob
(ENV_PARAMETERS: CONFIG_PRESET, WEIGHTS_SOURCE, WEIGHTS_SHA256, DATASET_SOURCE, ...; an empty
value is not sent), then from the package's defaults.
PIPELINE_ROOT and PIPELINE_SERVICE_ACCOUNT set where and as whom the run executes.

Every call to the KFP API goes through `call_api`: an unreachable, refusing (401/403) or
failing API ends in one UserError line (the CLI exits 2), after bounded retries where a retry
can help and cannot start a second run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import kfp
import kfp_server_api
import urllib3
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
from trainer.errors import StorageError, UserError
from trainer.io.atomic import copy_atomic
from trainer.io.storage import parse_uri

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
# Attempts per KFP API call, and the first pause between them (doubling): about a minute in
# all, what a restarting ml-pipeline Deployment or a port-forward being set up needs.
API_ATTEMPTS = 5
API_RETRY_SECONDS = 4.0

T = TypeVar("T")


def compile_pipeline(path: str | Path = PACKAGE) -> Path:
    """Compiles the pipeline into `path` (the committed package by default), atomically."""
    with tempfile.TemporaryDirectory() as folder:  # kfp picks the format from the suffix
        compiled = Path(folder) / "pipeline.yaml"
        compiler.Compiler().compile(mask_rcnn_pipeline, str(compiled))
        copy_atomic(compiled, path)
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


class _Client(kfp.Client):
    """kfp.Client whose health check asks once: `call_api` retries it and sorts the failures
    (kfp's own loop sleeps 5 s between five attempts and logs a traceback for each)."""

    def get_kfp_healthz(self, sleep_duration: int = 0):
        return self._healthz_api.healthz_service_get_healthz()


@contextlib.contextmanager
def _quiet_kfp() -> Iterator[None]:
    """kfp logs tracebacks and warns about versions on the root logger; the user gets our one
    line instead."""
    import warnings

    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _one_line(err: BaseException) -> str:
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        err = err.reason
    if isinstance(err, kfp_server_api.ApiException):
        body = err.body.decode(errors="replace") if isinstance(err.body, bytes) else err.body
        detail = f": {' '.join(str(body).split())[:200]}" if body else ""
        return f"HTTP {err.status} {err.reason}{detail}"
    return " ".join(f"{type(err).__name__}: {err}".split())


def call_api(host: str, what: str, call: Callable[[], T], *, repeatable: bool = True,
             attempts: int | None = None) -> T:
    """`call()` against the KFP API at `host`, failures as one UserError line.

    401/403 and other 4xx answers fail at once. Connection failures (nothing reached the
    API) are retried up to `attempts` times with a doubling pause; so are 5xx/408/429 answers
    and timeouts when `repeatable` (a call that cannot create a second run if repeated)."""
    attempts = attempts or API_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            with _quiet_kfp():
                return call()
        except kfp_server_api.ApiException as err:
            status = err.status or 0
            if status in (401, 403):
                raise UserError(
                    f"the KFP API at {host} refused to {what} ({_one_line(err)}): check the "
                    "credentials (KF_PIPELINES_SA_TOKEN_PATH, the ServiceAccount) and its "
                    "rights on pipelines in --namespace") from None
            transient = repeatable and (status in (408, 429) or status >= 500)
            failure: BaseException = err
        except (urllib3.exceptions.HTTPError, OSError) as err:  # OSError: TimeoutError, ...
            cause = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) else err
            never_sent = isinstance(cause, (urllib3.exceptions.NewConnectionError,
                                            ConnectionRefusedError))
            transient, failure = repeatable or never_sent, err
        if not transient:
            raise UserError(f"the KFP API at {host} could not {what}: {_one_line(failure)}"
                            ) from None
        if attempt == attempts:
            raise UserError(
                f"cannot {what}: the KFP API at {host} failed {attempts} times, last with "
                f"{_one_line(failure)}: check --host and that the API is up (kubectl -n "
                "kubeflow port-forward service/ml-pipeline 8888:8888)") from None
        time.sleep(API_RETRY_SECONDS * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _client(host: str, namespace: str | None) -> kfp.Client:
    try:
        parsed = parse_uri(host)
    except StorageError as err:
        raise UserError(f"--host {host!r} is malformed ({err}): expected "
                        "http(s)://HOST[:PORT], e.g. http://localhost:8888") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--host {host!r} is not an http(s) URL: expected "
                        "http(s)://HOST[:PORT], e.g. http://localhost:8888")
    client = call_api(host, "connect", lambda: _Client(host=host,
                                                       namespace=namespace or "kubeflow"))
    call_api(host, "answer its health check", client.get_kfp_healthz)
    return client


def submit(host: str, *, package: str | Path = PACKAGE, params: Sequence[str] = (),
           run_name: str | None = None, experiment: str = KFP_EXPERIMENT,
           namespace: str | None = None) -> dict:
    """Starts one run; returns its id and the arguments sent."""
    arguments = run_arguments(package, params)
    client = _client(host, namespace)
    result = call_api(host, "start a run", lambda: client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
        namespace=namespace, pipeline_root=os.environ.get("PIPELINE_ROOT") or None,
        service_account=os.environ.get("PIPELINE_SERVICE_ACCOUNT") or None), repeatable=False)
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
    found = call_api(host, "find or create the experiment",
                     lambda: client.create_experiment(experiment, namespace=namespace))
    recurring = call_api(host, "create the recurring run", lambda: client.create_recurring_run(
        experiment_id=found.experiment_id, job_name=name, cron_expression=cron_expression,
        max_concurrency=max_concurrency, no_catchup=True, params=arguments,
        pipeline_package_path=str(package),
        pipeline_root=os.environ.get("PIPELINE_ROOT") or None,
        service_account=os.environ.get("PIPELINE_SERVICE_ACCOUNT") or None), repeatable=False)
    return {"recurring_run_id": recurring.recurring_run_id, "cron": cron_expression,
            "arguments": _shown(arguments)}


def _shown(arguments: dict) -> dict:
    """Arguments for printing: a config sent as YAML text is shown by its NAME."""
    shown = dict(arguments)
    if shown.get("config_yaml"):
        shown["config_yaml"] = "<YAML text, NAME=" + str(
            yaml.safe_load(shown["config_yaml"]).get("NAME")) + ">"
    return shown
