"""MLflow conventions: one parent run per pipeline run, one nested run per stage.

    tracker = StageTracker(TrackingSettings(uri, "mask-rcnn", pipeline_run_id="8f2c..."),
                           stage="train-heads")
    with tracker:                                   # parent found or created, nested run started
        tracker.log_params(config.to_dict())
        run_training(..., custom_callbacks=[epoch_metrics_callback(tracker)])
        tracker.log_artifact(checkpoint, "checkpoint")
    # the nested run ends FINISHED, or FAILED (and its parent FAILED) when the body raised

Names (DESIGN.md, "MLflow"): the parent run carries the tag `pipeline_run_id` (the KFP run's
id) and `mrcnn.role=pipeline`; whichever stage comes first creates it, and the others find it
by that tag. Stage runs are named after the stage and carry `mrcnn.role=stage`,
`mrcnn.stage` and `mlflow.parentRunId`. Per-epoch metrics use Keras' log names (`loss`,
`rpn_class_loss`, ..., `val_*`) with step = the epoch just completed (the checkpoint's number).

Tracking never breaks training: every MLflow call goes through `StageTracker._call`, which turns
the first failure into one warning on stderr naming the tracking URI and what failed, then
skips the remaining calls of the stage. Artifacts are only ever read from disk, so a failed
upload cannot touch a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINE_RUN_TAG = "pipeline_run_id"
ROLE_TAG = "mrcnn.role"
STAGE_TAG = "mrcnn.stage"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Model training"
DATASET_CONTEXT_TAG = "mlflow.data.context"
SYSTEM_METRICS_SECONDS = 10.0  # sampling period of the system/* metrics
RUN_ID_ENV = "MRCNN_PIPELINE_RUN_ID"
RUN_NAME_ENV = "MRCNN_PIPELINE_RUN_NAME"
# The name of the Argo Workflow that runs the KFP run: the same for every task of the run and
# every retry of a task, so it keys the run when RUN_ID_ENV is empty.
WORKFLOW_ENV = "MRCNN_PIPELINE_WORKFLOW"
DEFAULT_EXPERIMENT = "mask-rcnn"
STAGES = ("fetch-weights", "prepare-data", "train-heads", "train-all", "evaluate")
EVALUATION_METRICS = ("bbox_mAP", "bbox_mAP50", "segm_mAP", "segm_mAP50", "voc_mAP50")
# An unreachable server should cost seconds, not MLflow's default of minutes of retries.
_FAST_FAILURE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(RuntimeError):
    """An MLflow call failed; the message names the tracking URI and the operation."""


@dataclass(frozen=True)
class TrackingSettings:
    """Where and under which pipeline run the stages log.

    uri: the tracking URI ("" = $MLFLOW_TRACKING_URI). experiment: the experiment name ("" =
    $MLFLOW_EXPERIMENT_NAME or "mask-rcnn"). pipeline_run_id: the key of the parent run.
    run_name: the parent run's name ("" = "pipeline-<pipeline_run_id>")."""

    uri: str = ""
    experiment: str = ""
    pipeline_run_id: str = ""
    run_name: str = ""

    @classmethod
    def from_env(cls, uri: str = "", experiment: str = "") -> TrackingSettings:
        """The pipeline run from the task's environment: RUN_ID_ENV (on Kubeflow, the pod's
        `pipeline/runid` label; `mrcnn run` sets it for its tasks) and RUN_NAME_ENV.

        Kubernetes sets an empty value for a label the pod lacks. Then WORKFLOW_ENV (the pod's
        `workflows.argoproj.io/workflow` label) keys the run as `workflow-<name>`: stable
        across the run's tasks and retries, so a retried train task still finds its run's
        checkpoint folder. Without either, the stage gets a random key (and says so)."""
        run_id = os.environ.get(RUN_ID_ENV, "")
        workflow = os.environ.get(WORKFLOW_ENV, "")
        if not run_id and workflow:
            run_id = f"workflow-{workflow}"
            print(f"MLflow: {RUN_ID_ENV} is empty (no pipeline/runid label): the run is keyed "
                  f"by its workflow ({run_id})", file=sys.stderr)
        if not run_id:
            run_id = f"unknown-{uuid.uuid4().hex[:12]}"
            print(f"MLflow: {RUN_ID_ENV} is not set: this stage gets a parent run of its own "
                  f"({run_id})", file=sys.stderr)
        return cls(uri, experiment, run_id, os.environ.get(RUN_NAME_ENV, ""))

    def resolved_uri(self) -> str:
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise TrackingError("no MLflow tracking URI: set the pipeline parameter "
                                "mlflow_tracking_uri or MLFLOW_TRACKING_URI")
        return uri

    def resolved_experiment(self) -> str:
        return (self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
                or DEFAULT_EXPERIMENT)


def run_folder(checkpoint_root: str | Path, pipeline_run_id: str) -> Path:
    """The folder of one pipeline run's checkpoints on the volume (a subfolder per stage):
    train_stage writes it, the TFJob launcher stages into it, clean-checkpoints removes it."""
    return Path(checkpoint_root) / (re.sub(r"[^A-Za-z0-9_.-]", "_", pipeline_run_id) or "run")


def local_tracking_uri(workdir: str | Path) -> str:
    """The local default: a SQLite store in the workdir (artifacts beside it, in mlartifacts)."""
    return f"sqlite:///{Path(workdir).absolute() / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: `<db folder>/mlartifacts/<experiment>` for a
    SQLite store, the server's default (None) otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return None


def client_for(uri: str):
    """An MlflowClient for `uri` that gives up on an unreachable server within seconds."""
    for key, value in _FAST_FAILURE_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when missing, as a
    model-training experiment: MLflow 3's UI then opens it on its runs, not on GenAI traces."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) is None:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # another stage created it at the same moment
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_parent_runs(client, exp_id: str, pipeline_run_id: str) -> list:
    """Parent runs of `pipeline_run_id`, oldest first (there is one unless stages raced)."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.{PIPELINE_RUN_TAG} = '{pipeline_run_id}' and "
        f"tags.`{ROLE_TAG}` = 'pipeline'", max_results=10)
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def parent_run_id(client, exp_id: str, settings: TrackingSettings) -> str:
    """The parent run of this pipeline run: found by its tag, or created.

    Stages that run in parallel (fetch-weights, prepare-data) may both create one; the oldest
    wins, and a stage that created a loser deletes it, so every stage nests under the same."""
    found = find_parent_runs(client, exp_id, settings.pipeline_run_id)
    if found:
        return found[0].info.run_id
    name = settings.run_name or f"pipeline-{settings.pipeline_run_id}"
    mine = client.create_run(exp_id, run_name=name,
                             tags={PIPELINE_RUN_TAG: settings.pipeline_run_id,
                                   ROLE_TAG: "pipeline"}).info.run_id
    winner = find_parent_runs(client, exp_id, settings.pipeline_run_id)[0].info.run_id
    if winner != mine:
        client.delete_run(mine)
    return winner


def stage_runs(client, parent_id: str, exp_id: str) -> list:
    """The nested stage runs of a parent run, oldest first."""
    runs = client.search_runs([exp_id], filter_string=f"tags.{PARENT_TAG} = '{parent_id}'")
    return sorted(runs, key=lambda run: run.info.start_time)


class StageTracker:
    """The MLflow side of one pipeline stage: a nested run under the pipeline run's parent.

    Every method is safe to call when tracking is off or broken (it does nothing then)."""

    def __init__(self, settings: TrackingSettings, stage: str, *, enabled: bool = True,
                 system_metrics_seconds: float = SYSTEM_METRICS_SECONDS, once: bool = False):
        """once: do nothing when the pipeline run already has a finished run of this stage
        (a stage recorded by a later task, which may be retried)."""
        self.settings = settings
        self.stage = stage
        self.enabled = enabled
        self.once = once
        self.system_metrics_seconds = system_metrics_seconds
        self.system_metrics = None
        self.uri = ""
        self.client = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.run_id: str | None = None
        self.failure: str | None = None

    # === Run lifecycle ===

    def __enter__(self) -> StageTracker:
        self.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.finish("FINISHED" if error is None else "FAILED", error)

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            self.uri = self.settings.resolved_uri()
        except TrackingError as err:
            self._warn(str(err))
            return

        def begin() -> None:
            self.client = client_for(self.uri)
            name = self.settings.resolved_experiment()
            self.experiment_id = experiment_id(self.client, name, self.uri)
            self.parent_id = parent_run_id(self.client, self.experiment_id, self.settings)
            if self.once and any(
                    run.data.tags.get(STAGE_TAG) == self.stage and run.info.status == "FINISHED"
                    for run in stage_runs(self.client, self.parent_id, self.experiment_id)):
                return
            self.run_id = self.client.create_run(
                self.experiment_id, run_name=self.stage,
                tags={PARENT_TAG: self.parent_id, ROLE_TAG: "stage", STAGE_TAG: self.stage,
                      PIPELINE_RUN_TAG: self.settings.pipeline_run_id}).info.run_id

        self._call("start the stage run", begin)
        if self.run_id:
            print(f"MLflow: run {self.run_id} ({self.stage}) under parent {self.parent_id} at "
                  f"{self.uri}", flush=True)
            self._call("start system metrics", self._start_system_metrics)

    def _start_system_metrics(self) -> None:
        """CPU, memory, disk and network (and GPU, when nvidia-ml-py finds one) as the run's
        `system/*` metrics, sampled in a background thread (MLflow's own monitor)."""
        if self.system_metrics_seconds <= 0:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.system_metrics = SystemMetricsMonitor(
            self.run_id, sampling_interval=self.system_metrics_seconds,
            tracking_uri=self.uri)
        self.system_metrics.start()

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        """Ends the stage run; a failure also marks the parent run FAILED, with the reason."""
        if self.run_id is None:
            return
        if self.system_metrics is not None:
            self._call("stop system metrics", self.system_metrics.finish)
            self.system_metrics = None
        if error is not None:
            reason = f"{type(error).__name__}: {error}"[:5000]
            self._call("record the failure", self.client.set_tag, self.run_id, "error", reason)
            self._call("record the failure", self.client.set_tag, self.parent_id, "error",
                       f"{self.stage}: {reason}"[:5000])
            self._call("end the parent run", self.client.set_terminated, self.parent_id,
                       "FAILED")
        self._call("end the stage run", self.client.set_terminated, self.run_id, status)

    def finish_pipeline(self) -> None:
        """Ends the parent run as FINISHED (the last stage calls this on success)."""
        if self.parent_id is not None:
            self._call("end the parent run", self.client.set_terminated, self.parent_id,
                       "FINISHED")

    # === Logging ===

    def log_params(self, params: Mapping[str, Any], *, parent: bool = False) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in sorted(params.items())]
        for run_id in (self.run_id, self.parent_id if parent else None):
            if run_id is not None:
                self._call("log params", self.client.log_batch, run_id, params=items)

    def log_config(self, config, params: Mapping[str, Any],
                   pipeline_config=None) -> None:
        """The stage's resolved config and `params` as its params, and config.yaml; the
        pipeline's config (before a stage's own device settings, the same in every stage) as
        the parent run's params."""
        self.log_params({**config.to_dict(), **params})
        self.log_params((pipeline_config or config).to_dict(), parent=True)
        self.log_text(config.to_yaml(), "config.yaml")

    def log_dataset(self, dataset_dir: str | Path, context: str) -> None:
        """The prepared dataset as this run's MLflow input (the UI's Dataset column and
        lineage): named after its source, keyed by dataset.json's fingerprint. `context`:
        "training", "evaluation" or "preparation"."""
        if self.run_id is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        def log() -> None:
            info = json.loads((Path(dataset_dir) / "dataset.json").read_text())
            fingerprint = str(info.get("fingerprint", ""))
            dataset = Dataset(name=f"{info['source']['name']}-{fingerprint[-8:]}",
                              digest=fingerprint[-32:],
                              source_type="local", source=json.dumps(
                                  {"uri": str(dataset_dir), "source": info.get("source")}),
                              profile=json.dumps({split: s.get("images") for split, s
                                                  in info.get("splits", {}).items()}))
            self.client.log_inputs(self.run_id, datasets=[
                DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])])

        self._call("log the dataset input", log)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *,
                    parent: bool = False) -> None:
        """Logs finite numbers; None (an undefined metric, e.g. no detections) is skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in sorted(metrics.items())
                 if v is not None and float(v) == float(v)]
        for run_id in (self.run_id, self.parent_id if parent else None):
            if run_id is not None and items:
                self._call("log metrics", self.client.log_batch, run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for run_id in (self.run_id, self.parent_id if parent else None):
            if run_id is not None:
                self._call("set tags", self.client.log_batch, run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a folder's content (read only: the source is never modified)."""
        if self.run_id is None or not Path(path).exists():
            return
        upload = (self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact)
        self._call(f"upload {path}", upload, self.run_id, str(path), artifact_path)

    def log_tensorboard(self, root: str | Path) -> None:
        """TensorBoard event files `root/<run folder>/<train|validation>/events.out.tfevents*`
        as artifacts `tensorboard/<run folder>/<train|validation>/` (uploaded again as they
        grow)."""
        for events in sorted(Path(root).glob("*/*/events.out.tfevents*")):
            self.log_artifact(events, f"tensorboard/{events.parent.parent.name}/"
                                      f"{events.parent.name}")

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.run_id is not None:
            self._call(f"upload {artifact_file}", self.client.log_text, self.run_id, text,
                       artifact_file)

    def register_model(self, saved_model: str | Path, example_image: bytes, name: str, *,
                       alias: str = "", tags: Mapping[str, Any] | None = None) -> str | None:
        """Logs the exported SavedModel as this run's MLflow model (see `mlflow_model`),
        registers it as a new version of `name` tagged with `tags` and the pipeline run id,
        and points `alias` (e.g. "champion") at it. Returns the version (None when tracking
        is off or failed)."""
        if self.run_id is None:
            return None

        def register() -> str:
            # Lazy: TensorFlow and mlflow.pyfunc are heavy; only the evaluate stage registers.
            import mlflow

            from trainer.stages.mlflow_model import log_serving_model

            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                info = log_serving_model(saved_model, example_image)
            version_tags = {PIPELINE_RUN_TAG: self.settings.pipeline_run_id,
                            **{k: str(v) for k, v in (tags or {}).items()}}
            version = str(mlflow.register_model(info.model_uri, name,
                                                tags=version_tags).version)
            if alias:
                self.client.set_registered_model_alias(name, alias, version)
            return version

        version = self._call(f"register model {name!r}", register)
        if version is not None:
            self.set_tags({"registered_model": f"{name}/{version}"}, parent=True)
        return version

    # === Failures ===

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs), or None after a failure: the first one is reported on stderr
        and turns tracking off for the rest of the stage."""
        if self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any MLflow/network error: report, go on
            first = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            self._warn(f"could not {what} at {self.uri or '(no URI)'}: {first}")
            return None

    def _warn(self, message: str) -> None:
        self.failure = message
        print(f"MLflow tracking error ({self.stage}): {message}; the stage goes on without "
              "tracking (checkpoints and KFP outputs are unaffected)", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def failure_recorded(stage: str):
    """For the cached tasks, which track nothing while they work (their inputs hold no MLflow
    settings, see stages.fetch): an exception is recorded as a FAILED stage run, with its
    reason, in the tracking server and experiment the task's environment names
    (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), then raised again."""
    try:
        yield
    except Exception as error:
        tracker = StageTracker(TrackingSettings.from_env(), stage, system_metrics_seconds=0)
        tracker.start()
        tracker.finish("FAILED", error)
        raise


def epoch_metrics_callback(tracker: StageTracker, tensorboard_root: str | Path | None = None):
    """A Keras callback logging each epoch's logs (loss, rpn_class_loss, ..., val_*) to the
    stage run with step = the epoch just completed (1-based, the checkpoint's number), and
    the TensorBoard event files under `tensorboard_root` (the stage's checkpoint folder) as
    artifacts `tensorboard/<run folder>/<train|validation>`, so they outlive the volume. It
    never raises: a broken server ends tracking, not training."""
    import keras  # here only: `pipeline` imports this module and starts without TensorFlow

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            tracker.log_metrics({k: v for k, v in (logs or {}).items()
                                 if isinstance(v, (int, float)) or hasattr(v, "__float__")},
                                step=epoch + 1)
            if tensorboard_root is not None:
                tracker.log_tensorboard(tensorboard_root)

    return EpochMetrics()


# === Reading a pipeline run back ===


def pipeline_failure(uri: str, experiment: str, run_id: str, kfp_message: str) -> str:
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


def pipeline_summary(uri: str, experiment: str, run_id: str) -> list[dict]:
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
