"""A training stage on several GPU nodes: a Kubeflow `TFJob` (kubeflow.org/v1, the training
operator) that this launcher creates, watches and deletes through the Kubernetes API.

    result = run_tfjob_stage(TFJobStage(...), out_dir, TFJobApi.in_cluster())
    # -> {"metrics", "checkpoint", "epoch"}, as trainer.stages.train.train_stage returns;
    # out_dir gets the chief's final checkpoint, config.yaml and summary.json

The TFJob has one chief and workers-1 workers, each a pod of the pipeline's image on the GPU
pool that runs `python -m trainer.stages.tfjob_pod ARGS_JSON` (tfjob_pod.py: train_stage with
these arguments) and mounts the checkpoint claim, which must be ReadWriteMany: every pod mounts
it, on different nodes. Folders on that claim, per pipeline run and stage:

    {checkpoint_root}/{run}/{stage}/             the checkpoints (as the single-pod task)
    {checkpoint_root}/{run}/{stage}.tfjob/init/  the stage's input model, copied by the launcher
    {checkpoint_root}/{run}/{stage}.tfjob/out/chief-0/   the chief's final checkpoint, config,
                                                 summary: copied into the task's Model output

The job's name comes from the pipeline run and the stage, so a retried launcher finds the job
it created: running or succeeded, it watches (adopts) it; failed, it deletes and recreates it,
and the new pods resume from the stage's newest checkpoint like a retried single-pod task.
The launcher polls the job and prints each new condition; on Succeeded or Failed it deletes
the job (and so its pods), and on SIGTERM too (a terminated run; an evicted launcher's retry
recreates the job). It never touches a job it did not name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import ClusterError, UserError
from trainer.io.atomic import copy_atomic
from trainer.stages.inputs import stage_config
from trainer.stages.tracking import RUN_ID_ENV, RUN_NAME_ENV, TrackingSettings, run_folder

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
CONTAINER = "tensorflow"  # the container name the training operator looks for (and its port)
PORT_NAME, PORT = "tfjob-port", 2222
ENTRYPOINT = ["python", "-m", "trainer.stages.tfjob_pod"]
# The labels of every TFJob pod: the namespace's default deny selects `part-of`, and
# k8s/base/networkpolicies.yaml gives `name=mask-rcnn-tfjob` its flows (2222 among them).
POD_LABELS = {"app.kubernetes.io/part-of": "mask-rcnn-pipeline",
              "app.kubernetes.io/name": "mask-rcnn-tfjob"}
STAGE_LABEL = "mask-rcnn.pipeline/stage"
RUN_ANNOTATION = "mask-rcnn.pipeline/run"
# Pods restart on the exit codes the operator deems retryable (130, 137, 143: a signal, such as
# a preempted node's SIGTERM) and fail the job on any other (a UserError exits 2).
RESTART_POLICY = "ExitCode"
BACKOFF_LIMIT = 6  # pod restarts of a job before it fails
WATCH_FAILURES = 8  # consecutive failed polls (5xx, unreachable) a watch rides out
TTL_SECONDS = 24 * 3600  # a finished job the launcher never deleted (it died) goes after a day
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_ACCOUNT_ENV = "MRCNN_SERVICE_ACCOUNT"  # the launcher pod's spec.serviceAccountName
SUMMARY_FILE = "summary.json"  # trainer.stages.train.SUMMARY_FILE (not imported: TensorFlow)


@dataclass(frozen=True)
class PodSettings:
    """Where and how each TFJob pod runs: the pipeline's GPU-pool settings for the train task."""

    image: str
    gpu_resource: str  # the accelerator's resource name, e.g. nvidia.com/gpu
    gpu_count: int  # per pod (the config's GPU_COUNT)
    cpu: str
    memory: str
    node_selector: Mapping[str, str]
    toleration: Mapping[str, str]
    pvc: str
    mount_path: str
    service_account: str = ""  # "" = the namespace's default
    config_map: str = "mask-rcnn-pipeline-config"
    credentials_secret: str = "mlflow-pipeline-credentials"


@dataclass(frozen=True)
class TFJobStage:
    """One training stage as a TFJob: train_stage's arguments plus the job's shape."""

    stage: str
    workers: int
    config_preset: str
    config_yaml: str
    overrides: Sequence[str]
    layers: str
    epochs: int
    learning_rate: float
    lr_factor: float
    dataset_dir: str  # gs:// (read in place by every pod) or a local folder (copied)
    init_dir: str  # the previous stage's model or the fetched weights (copied to the claim)
    exclude: Sequence[str]
    checkpoint_root: str
    upstream: bool
    tracking: TrackingSettings
    pods: PodSettings


def job_name(pipeline_run_id: str, stage: str) -> str:
    """The TFJob's name: the same for every retry of the stage's task in a pipeline run, a
    DNS label short enough for the pod and Service names the operator derives from it."""
    digest = hashlib.sha256(pipeline_run_id.encode()).hexdigest()[:10]
    return f"mrcnn-{stage}-{digest}"[:52].rstrip("-")


def staging_dir(job: TFJobStage) -> Path:
    return run_folder(job.checkpoint_root, job.tracking.pipeline_run_id) / f"{job.stage}.tfjob"


def check_stage(job: TFJobStage) -> None:
    """One-line errors for what would make every pod fail (or never start), before any."""
    if job.workers < 2:
        raise UserError(f"workers={job.workers}: a TFJob needs at least 2 (1 runs the "
                        "single-pod train task)")
    if job.pods.gpu_count < 1:
        raise UserError(f"gpu_count={job.pods.gpu_count}: each TFJob pod needs at least 1 GPU")
    if job.epochs < 1:
        raise UserError(f"epochs must be at least 1, got {job.epochs}")
    if not job.tracking.pipeline_run_id:
        raise UserError(f"no pipeline run id ({RUN_ID_ENV}): the TFJob of a retried task "
                        "could not be found again")


def pod_arguments(job: TFJobStage, dataset_dir: str, init_dir: str) -> dict:
    """What tfjob_pod.py passes to train_stage (JSON): the stage's arguments with WORKERS in the
    overrides, and out_root, the folder under which each pod writes its outputs."""
    return {
        "config_preset": job.config_preset, "config_yaml": job.config_yaml,
        "overrides": [*job.overrides, f"WORKERS={job.workers}"],
        "gpu_count": job.pods.gpu_count, "stage": job.stage, "layers": job.layers,
        "epochs": job.epochs, "learning_rate": job.learning_rate,
        "lr_factor": job.lr_factor, "dataset_dir": dataset_dir, "init_dir": init_dir,
        "exclude": list(job.exclude), "checkpoint_root": job.checkpoint_root,
        "out_root": str(staging_dir(job) / "out"), "upstream": job.upstream,
        "mlflow_tracking_uri": job.tracking.uri, "mlflow_experiment": job.tracking.experiment,
    }


def _env(job: TFJobStage) -> list[dict]:
    pods = job.pods
    env = [{"name": name, "valueFrom": {"configMapKeyRef": {
               "name": pods.config_map, "key": name, "optional": True}}}
           for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")]
    env += [{"name": name, "valueFrom": {"secretKeyRef": {
                "name": pods.credentials_secret, "key": key, "optional": True}}}
            for key, name in (("username", "MLFLOW_TRACKING_USERNAME"),
                              ("password", "MLFLOW_TRACKING_PASSWORD"))]
    # The pods key their MLflow parent run and checkpoint folder by the launcher's run id.
    env.append({"name": RUN_ID_ENV, "value": job.tracking.pipeline_run_id})
    if job.tracking.run_name:
        env.append({"name": RUN_NAME_ENV, "value": job.tracking.run_name})
    return env


def _pod_template(job: TFJobStage, arguments: dict) -> dict:
    pods = job.pods
    spec = {
        "automountServiceAccountToken": False,  # training needs no Kubernetes API
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "nodeSelector": dict(pods.node_selector),
        "tolerations": [dict(pods.toleration)],
        "containers": [{
            "name": CONTAINER,
            "image": pods.image,
            "command": list(ENTRYPOINT),
            "args": [json.dumps(arguments, sort_keys=True)],
            "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
            "env": _env(job),
            "resources": {
                "requests": {"cpu": pods.cpu, "memory": pods.memory,
                             pods.gpu_resource: str(pods.gpu_count)},
                "limits": {"memory": pods.memory, pods.gpu_resource: str(pods.gpu_count)},
            },
            "volumeMounts": [{"name": "checkpoints", "mountPath": pods.mount_path}],
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": [{"name": "checkpoints",
                     "persistentVolumeClaim": {"claimName": pods.pvc}}],
    }
    if pods.service_account:
        spec["serviceAccountName"] = pods.service_account
    labels = {**POD_LABELS, STAGE_LABEL: job.stage}
    return {"metadata": {"labels": labels}, "spec": spec}


def tfjob_manifest(job: TFJobStage, namespace: str, dataset_dir: str, init_dir: str) -> dict:
    """The TFJob: one Chief and workers-1 Workers of the same pod."""
    template = _pod_template(job, pod_arguments(job, dataset_dir, init_dir))
    replicas = {"Chief": 1, "Worker": job.workers - 1}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job_name(job.tracking.pipeline_run_id, job.stage),
                     "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": POD_LABELS[
                                    "app.kubernetes.io/part-of"], STAGE_LABEL: job.stage},
                     "annotations": {RUN_ANNOTATION: job.tracking.pipeline_run_id}},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": BACKOFF_LIMIT,
                          "ttlSecondsAfterFinished": TTL_SECONDS},
            "tfReplicaSpecs": {
                kind: {"replicas": count, "restartPolicy": RESTART_POLICY,
                       "template": template}
                for kind, count in replicas.items()},
        },
    }


# === The Kubernetes API ===


class TFJobApi:
    """The calls the launcher makes, through the `kubernetes` client: TFJobs (create, get,
    delete) and one PersistentVolumeClaim read (its access modes)."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def in_cluster(cls) -> TFJobApi:
        """The pod's ServiceAccount token and namespace (KFP runs the task in-cluster)."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
            namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        except (config.ConfigException, OSError) as err:
            raise ClusterError(f"workers > 1 runs a TFJob and needs the in-cluster Kubernetes "
                               f"API ({err}); locally, run with workers=1") from None
        return cls(client.ApiClient(), namespace)

    @staticmethod
    def _status(err) -> int:
        return int(getattr(err, "status", 0) or 0)

    def _call(self, what: str, call: Callable, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call(*args, **kwargs)
        except ApiException as err:
            reason = err.reason
            try:
                reason = json.loads(err.body or "{}").get("message") or reason
            except ValueError:
                pass
            if err.status == 403:
                reason += " (Role mask-rcnn-tfjob-launcher: k8s/base/tfjob-rbac.yaml)"
            raise _ApiError(err.status, f"{what}: HTTP {err.status}: {reason}") from None
        except HTTPError as err:
            raise ClusterError(f"{what}: the Kubernetes API is unreachable: {err}") from None

    def create(self, manifest: dict) -> dict:
        return self._call(f"create TFJob {manifest['metadata']['name']}",
                          self._custom.create_namespaced_custom_object,
                          GROUP, VERSION, self.namespace, PLURAL, manifest)

    def get(self, name: str) -> dict | None:
        try:
            return self._call(f"get TFJob {name}", self._custom.get_namespaced_custom_object,
                              GROUP, VERSION, self.namespace, PLURAL, name)
        except _ApiError as err:
            if err.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        try:
            self._call(f"delete TFJob {name}", self._custom.delete_namespaced_custom_object,
                       GROUP, VERSION, self.namespace, PLURAL, name,
                       propagation_policy="Background")
        except _ApiError as err:
            if err.status != 404:
                raise

    def claim_access_modes(self, claim: str) -> list[str]:
        found = self._call(f"read PersistentVolumeClaim {claim}",
                           self._core.read_namespaced_persistent_volume_claim,
                           claim, self.namespace)
        return list(found.spec.access_modes or [])


class TaskStopped(Exception):
    """The launcher's pod got SIGTERM: the run was terminated, or the pod evicted."""


@contextlib.contextmanager
def sigterm_stops_the_task() -> Iterator[None]:
    """SIGTERM raises TaskStopped in the block (where the launcher deletes its job: a
    terminated run must not leave GPUs training); the previous handler comes back after."""
    def stop(signum, frame):
        raise TaskStopped(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ApiError(ClusterError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# === Watching ===


def conditions(job: dict) -> list[dict]:
    return list((job.get("status") or {}).get("conditions") or [])


def terminal_state(job: dict) -> tuple[str, dict] | None:
    """("Succeeded" | "Failed", its condition) once the job is finished, else None."""
    for condition in conditions(job):
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"], condition
    return None


def describe(condition: dict) -> str:
    text = f"{condition.get('type')}={condition.get('status')}"
    if condition.get("reason"):
        text += f" ({condition['reason']})"
    if condition.get("message"):
        text += f": {condition['message']}"
    return " ".join(text.split())  # one line, whatever the operator wrote


def watch(api: TFJobApi, name: str, *, poll_seconds: float = 15.0,
          log: Callable[[str], None] = print,
          sleep: Callable[[float], None] = time.sleep) -> tuple[str, dict]:
    """Polls the TFJob until it succeeds or fails, logging each new condition once. A job
    that disappears (deleted by someone else) is an error."""
    seen: set[tuple] = set()
    failures = 0
    while True:
        try:
            job = api.get(name)
            failures = 0
        except ClusterError as err:
            # An API server restarting (a control-plane upgrade) answers 5xx or nothing for a
            # while: keep watching; anything else, or too long, fails the task (its retry
            # adopts the job).
            failures += 1
            if getattr(err, "status", 500) < 500 or failures > WATCH_FAILURES:
                raise
            log(f"TFJob {name}: {err} (attempt {failures} of {WATCH_FAILURES}; watching on)")
            sleep(poll_seconds)
            continue
        if job is None:
            raise ClusterError(f"TFJob {name} was deleted while the launcher watched it")
        for condition in conditions(job):
            key = (condition.get("type"), condition.get("status"), condition.get("reason"),
                   condition.get("lastTransitionTime"))
            if key not in seen:
                seen.add(key)
                log(f"TFJob {name}: {describe(condition)}")
        finished = terminal_state(job)
        if finished:
            return finished
        sleep(poll_seconds)


def wait_gone(api: TFJobApi, name: str, *, timeout: float = 300.0, poll_seconds: float = 5.0,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> None:
    deadline = clock() + timeout
    while api.get(name) is not None:
        if clock() > deadline:
            raise ClusterError(f"TFJob {name} is still there {timeout:.0f}s after its deletion")
        sleep(poll_seconds)


# === The stage ===


def _copy_folder(src: Path, dest: Path) -> None:
    """Every file of src under dest (each atomically), so a retry after an interrupted copy
    finds whole files only."""
    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(src)
            if not (target.is_file() and target.stat().st_size == path.stat().st_size):
                copy_atomic(path, target)


def stage_inputs(job: TFJobStage) -> tuple[str, str]:
    """(dataset_dir, init_dir) as the pods see them: a gs:// dataset in place, anything local
    (KFP's local copies of the artifacts) copied onto the shared claim."""
    staging = staging_dir(job)
    init = Path(job.init_dir)
    if not init.is_dir():
        raise UserError(f"{job.stage}: the input model {job.init_dir} is not a folder")
    _copy_folder(init, staging / "init")
    dataset = job.dataset_dir
    if not dataset.startswith("gs://"):
        if not Path(dataset).is_dir():
            raise UserError(f"{job.stage}: the dataset {dataset} is not a folder or gs:// URI")
        _copy_folder(Path(dataset), staging / "dataset")
        dataset = str(staging / "dataset")
    return dataset, str(staging / "init")


def check_claim(api: TFJobApi, claim: str) -> None:
    modes = api.claim_access_modes(claim)
    if "ReadWriteMany" not in modes:
        raise UserError(f"checkpoint_pvc={claim} is {', '.join(modes) or 'without access modes'}:"
                        f" a TFJob's pods mount it on several nodes, which needs ReadWriteMany "
                        f"(README: 'Training on several GPU nodes')")


def collect(job: TFJobStage, out_dir: str) -> dict:
    """The chief's outputs into the task's Model folder: train_stage's result."""
    chief = staging_dir(job) / "out" / "chief-0"
    summary_path = chief / SUMMARY_FILE
    if not summary_path.is_file():
        raise ClusterError(f"{job.stage}: the TFJob succeeded but its chief wrote no "
                           f"{SUMMARY_FILE} in {chief}")
    _copy_folder(chief, Path(out_dir))
    summary = json.loads(summary_path.read_text())
    checkpoint = Path(summary["checkpoint"]).name
    if not (Path(out_dir) / checkpoint).is_file():
        raise ClusterError(f"{job.stage}: the chief's checkpoint {checkpoint} is not in {chief}")
    metrics = {k: values[-1] for k, values in summary.get("history", {}).items() if values}
    return {"metrics": metrics, "checkpoint": checkpoint, "epoch": summary["epoch"]}


def run_tfjob_stage(job: TFJobStage, out_dir: str, api: TFJobApi, *,
                    poll_seconds: float = 15.0, log: Callable[[str], None] = print,
                    sleep: Callable[[float], None] = time.sleep) -> dict:
    """Creates (or adopts, on a retry) the stage's TFJob, watches it to its end, deletes it,
    and returns the chief's result. Raises ClusterError when the job fails."""
    check_stage(job)
    # A bad config fails here, not in every pod after the GPUs were scheduled. (WORKERS, which
    # the pods add, is the multi-worker training code's key: checked by the pods.)
    stage_config(job.config_preset, job.config_yaml, job.overrides)
    check_claim(api, job.pods.pvc)
    name = job_name(job.tracking.pipeline_run_id, job.stage)
    existing = api.get(name)
    if existing is not None and (terminal_state(existing) or ("",))[0] == "Failed":
        log(f"TFJob {name}: failed in an earlier attempt: deleting it and starting again "
            "(the pods resume from the stage's newest checkpoint)")
        api.delete(name)
        wait_gone(api, name, poll_seconds=poll_seconds, sleep=sleep)
        existing = None
    if existing is None:
        dataset_dir, init_dir = stage_inputs(job)
        shutil.rmtree(staging_dir(job) / "out", ignore_errors=True)
        manifest = tfjob_manifest(job, api.namespace, dataset_dir, init_dir)
        api.create(manifest)
        log(f"TFJob {name}: created in {api.namespace}: 1 chief + {job.workers - 1} "
            f"worker(s), {job.pods.gpu_count} GPU(s) each; logs: kubectl -n {api.namespace} "
            f"logs -f {name}-chief-0")
    else:
        log(f"TFJob {name}: found from an earlier attempt of this task: watching it")
    try:
        state, condition = watch(api, name, poll_seconds=poll_seconds, log=log, sleep=sleep)
    except TaskStopped:
        # A cancelled run stops its GPUs too. An evicted launcher pod loses the epoch in
        # progress: its retry creates the job again, which resumes from the newest checkpoint.
        log(f"TFJob {name}: the task was stopped: deleting the job")
        api.delete(name)
        raise
    if state == "Failed":
        api.delete(name)
        raise ClusterError(f"TFJob {name} failed: {describe(condition)} (pod logs: kubectl "
                           f"-n {api.namespace} logs {name}-chief-0)")
    result = collect(job, out_dir)
    api.delete(name)
    log(f"TFJob {name}: succeeded at epoch {result['epoch']}; deleted")
    return result



def launch_training(*, stage: str, workers: int, config_preset: str, config_yaml: str,
                    overrides: Sequence[str], gpu_count: int, gpu_resource: str, layers: str,
                    epochs: int, learning_rate: float, lr_factor: float, dataset_path: str,
                    dataset_uri: str, init_dir: str, exclude: Sequence[str],
                    checkpoint_root: str, checkpoint_pvc: str, checkpoint_mount: str,
                    upstream: bool, mlflow_tracking_uri: str, mlflow_experiment: str,
                    pod_resources: Mapping[str, str], node_selector: Mapping[str, str],
                    toleration: Mapping[str, str], image: str, out_dir: str) -> dict:
    """The pipeline's TFJob launcher task (components/train_tfjob.py), in-cluster."""
    root = Path(checkpoint_root)
    if not root.is_relative_to(checkpoint_mount):
        raise UserError(f"checkpoint_root={checkpoint_root} is not on the checkpoint claim "
                        f"mounted at {checkpoint_mount}, which the TFJob's pods share")
    job = TFJobStage(
        stage=stage, workers=workers, config_preset=config_preset, config_yaml=config_yaml,
        overrides=list(overrides), layers=layers, epochs=epochs, learning_rate=learning_rate,
        lr_factor=lr_factor,
        dataset_dir=dataset_uri if dataset_uri.startswith("gs://") else dataset_path,
        init_dir=init_dir, exclude=list(exclude), checkpoint_root=checkpoint_root,
        upstream=upstream,
        tracking=TrackingSettings.from_env(mlflow_tracking_uri, mlflow_experiment),
        pods=PodSettings(image=image, gpu_resource=gpu_resource, gpu_count=gpu_count,
                         cpu=pod_resources["cpu"], memory=pod_resources["memory"],
                         node_selector=dict(node_selector), toleration=dict(toleration),
                         pvc=checkpoint_pvc, mount_path=checkpoint_mount,
                         service_account=os.environ.get(SERVICE_ACCOUNT_ENV, "")))
    check_stage(job)
    with sigterm_stops_the_task():
        return run_tfjob_stage(job, out_dir, TFJobApi.in_cluster())
