"""The Mask R-CNN pipeline: wiring and resources only (the work is in `trainer.stages`).

                    ┌─► fetch-weights ─┐
    resolve-config ─┤                  ├─► train-heads ─► train-all ─► evaluate ─► clean-checkpoints
                    └─► prepare-data ──┘

fetch-weights and prepare-data are cached and get only what decides their results (the
model-shape keys, the data source and record settings, from resolve-config); train-heads
writes their MLflow records from their outputs, so a cached run is recorded too.

Training tasks request GPU_COUNT GPUs (`gpu_count`, also set as the config's GPU_COUNT), run on
the GPU node pool (node selector pool=gpu, toleration nvidia.com/gpu=present:NoSchedule, as
k8s/base/pipeline-config.yaml fixes them), and are retried when their pod dies (a preempted
node): the retried task resumes from its newest checkpoint in `checkpoint_root`, a
PersistentVolumeClaim (`checkpoint_pvc`) mounted into both training tasks. Once evaluate has
succeeded, clean-checkpoints (CPU only, the same claim) removes the run's folder from it (each
stage's final checkpoint is its task's artifact) unless `keep_checkpoints`.

Every task reads MLFLOW_TRACKING_URI from the ConfigMap mask-rcnn-pipeline-config unless the
`mlflow_tracking_uri` parameter is set, and its MLflow user from the Secret
mlflow-pipeline-credentials. Every task pod carries TASK_POD_LABELS, which the namespace's
NetworkPolicies select (k8s/base/networkpolicies.yaml). Locally (`mrcnn run`, kfp.local) the
Kubernetes settings are ignored.

With `workers` > 1 each training stage runs instead as a Kubeflow TFJob of `workers` GPU pods
(1 chief + workers-1 workers, each with gpu_count GPUs, the same pool, image, checkpoint claim
and MLflow settings), which a CPU-only task `train_tfjob` creates, watches and deletes
(trainer/stages/tfjob.py); the claim must then be ReadWriteMany. The choice is one dsl.If /
dsl.Else on `workers` around the whole chain train-heads -> train-all -> evaluate ->
clean-checkpoints (`_train_chain`):
kfp 2.17.3's local runner cannot resolve a dsl.OneOf of artifacts, which one condition per
stage would need, so each branch has its own evaluate.
"""

# No `from __future__ import annotations`: KFP reads the parameter annotations as types.
from kfp import dsl, kubernetes

from components import (
    clean_checkpoints,
    evaluate,
    fetch_weights,
    prepare_data,
    resolve_config,
    train,
    train_tfjob,
)
from trainer.stages.tfjob import SERVICE_ACCOUNT_ENV
from trainer.stages.tracking import RUN_ID_ENV, WORKFLOW_ENV

PIPELINE_NAME = "mask-rcnn"
CONFIG_MAP = "mask-rcnn-pipeline-config"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
GPU_NODE_SELECTOR = ("pool", "gpu")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present",
                  "effect": "NoSchedule"}
TRAIN_RESOURCES = {"cpu": "6", "memory": "24Gi"}
DATA_RESOURCES = {"cpu": "2", "memory": "8Gi"}
CLEANUP_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
TRAIN_RETRIES = 3  # preemptions survived per training task
# The TFJob launcher (workers > 1): a CPU-only task that mostly waits.
LAUNCHER_RESOURCES = {"cpu": "1", "memory": "2Gi"}
DEMO_CONFIG = "configs/demo.yaml"  # a preset inside the image
# MLflow's basic-auth user of the pipeline (keys username, password), created out of band.
MLFLOW_CREDENTIALS_SECRET = "mlflow-pipeline-credentials"
# The labels the NetworkPolicies select task pods by (default deny, then their own flows).
TASK_POD_LABELS = {"app.kubernetes.io/part-of": "mask-rcnn-pipeline",
                   "app.kubernetes.io/name": "mask-rcnn-task"}


def _with_tracking_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLFLOW_TRACKING_URI (and MLFLOW_EXPERIMENT_NAME, where the cached tasks record a
    failure: they get no MLflow parameters) from the ConfigMap and the MLflow user from the
    Secret (both
    optional: the parameter may name another server, and without credentials MLflow refuses
    the calls, which a stage reports and trains on), the KFP run id from the pod's label and,
    should that label be missing, the Argo Workflow's name (the same across retries). Neither
    is a task input, so they do not change the cache key of fetch-weights and prepare-data."""
    kubernetes.use_config_map_as_env(task, CONFIG_MAP,
                                     {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
                                      "MLFLOW_EXPERIMENT_NAME": "MLFLOW_EXPERIMENT_NAME"},
                                     optional=True)
    kubernetes.use_secret_as_env(task, MLFLOW_CREDENTIALS_SECRET,
                                 {"username": "MLFLOW_TRACKING_USERNAME",
                                  "password": "MLFLOW_TRACKING_PASSWORD"}, optional=True)
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, "metadata.labels['pipeline/runid']")
    kubernetes.use_field_path_as_env(task, WORKFLOW_ENV,
                                     "metadata.labels['workflows.argoproj.io/workflow']")
    for key, value in TASK_POD_LABELS.items():
        kubernetes.add_pod_label(task, key, value)
    return task


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


def _on_gpu_pool(task: dsl.PipelineTask, gpu_type: str, gpu_count: int, checkpoint_pvc: str
                 ) -> dsl.PipelineTask:
    task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
    _resources(task, **TRAIN_RESOURCES)
    kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.mount_pvc(task, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2.0)
    return task.set_caching_options(False)


def _single_pod_stage(gpu_type, gpu_count, checkpoint_pvc, workers, **stage
                      ) -> dsl.PipelineTask:
    """A training stage as one task on a GPU node (workers == 1)."""
    task = train(gpu_count=gpu_count, **stage)
    return _with_tracking_env(_on_gpu_pool(task, gpu_type, gpu_count, checkpoint_pvc))


def _tfjob_stage(gpu_type, gpu_count, checkpoint_pvc, workers, **stage) -> dsl.PipelineTask:
    """A training stage as a TFJob of `workers` GPU pods, launched and watched by a CPU-only
    task (no GPU, no GPU pool) that mounts the claim to stage inputs and collect the chief's
    output, and is retried like the single-pod task: a retry adopts or recreates the job."""
    task = train_tfjob(workers=workers, gpu_count=gpu_count, gpu_type=gpu_type,
                       checkpoint_pvc=checkpoint_pvc, checkpoint_mount=CHECKPOINT_MOUNT,
                       pod_resources=TRAIN_RESOURCES,
                       node_selector=dict([GPU_NODE_SELECTOR]), toleration=GPU_TOLERATION,
                       **stage)
    _resources(task, **LAUNCHER_RESOURCES)
    kubernetes.mount_pvc(task, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    # The TFJob's pods run as the launcher's ServiceAccount (its cloud identity), tokenless.
    kubernetes.use_field_path_as_env(task, SERVICE_ACCOUNT_ENV, "spec.serviceAccountName")
    task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2.0)
    return _with_tracking_env(task.set_caching_options(False))


def _train_chain(stage_task, *, data, weights, common, gpu_type, gpu_count, workers,
                 checkpoint_root, checkpoint_pvc, heads_epochs, heads_learning_rate,
                 total_epochs, all_learning_rate, weights_exclude, evaluation_limit, min_map,
                 gate_key, num_pictures, registered_model_name, model_alias,
                 keep_checkpoints) -> None:
    """train-heads -> train-all -> evaluate -> clean-checkpoints, the training stages made by
    `stage_task`. Tasks
    that follow evaluate belong here too: outside the dsl.If/dsl.Else a task cannot depend on
    one inside it (without dsl.OneOf, which kfp.local cannot run)."""
    place = dict(gpu_type=gpu_type, gpu_count=gpu_count, checkpoint_pvc=checkpoint_pvc,
                 workers=workers, checkpoint_root=checkpoint_root,
                 dataset=data.outputs["dataset"], **common)
    heads = stage_task(stage="train-heads", layers="heads", epochs=heads_epochs,
                       learning_rate=heads_learning_rate, lr_factor=1.0,
                       exclude=weights_exclude, upstream=True, init=weights.outputs["weights"],
                       **place).set_display_name("train-heads")
    all_layers = stage_task(stage="train-all", layers="all", epochs=total_epochs,
                            learning_rate=all_learning_rate, lr_factor=0.1, exclude=[],
                            upstream=False, init=heads.outputs["model"],
                            **place).set_display_name("train-all")
    scores = evaluate(limit=evaluation_limit, min_map=min_map, gate_key=gate_key,
                      num_pictures=num_pictures, registered_model_name=registered_model_name,
                      model_alias=model_alias,
                      dataset=data.outputs["dataset"], model=all_layers.outputs["model"],
                      **common).set_display_name("evaluate")
    _with_tracking_env(_resources(scores, **DATA_RESOURCES)).set_caching_options(False)

    cleanup = clean_checkpoints(checkpoint_root=checkpoint_root,
                                keep_checkpoints=keep_checkpoints
                                ).set_display_name("clean-checkpoints").after(scores)
    kubernetes.mount_pvc(cleanup, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    _with_tracking_env(_resources(cleanup, **CLEANUP_RESOURCES)).set_caching_options(False)


@dsl.pipeline(name=PIPELINE_NAME, description="Mask R-CNN: fetch weights, prepare data, "
              "train heads then all layers, evaluate; tracked in MLflow")
def mask_rcnn_pipeline(
    config_preset: str = DEMO_CONFIG,
    config_yaml: str = "",
    config_overrides: list = [],  # noqa: B006 - KFP parameters take literal defaults
    weights_source: str = "none",
    weights_sha256: str = "",
    weights_exclude: list = [],  # noqa: B006
    dataset_source: str = "shapes",
    dataset_count: int = 0,
    val_fraction: float = 0.1,
    heads_epochs: int = 1,
    heads_learning_rate: float = 0.0,
    total_epochs: int = 3,
    all_learning_rate: float = 0.0,
    gpu_type: str = "nvidia.com/gpu",
    gpu_count: int = 1,
    workers: int = 1,
    checkpoint_root: str = CHECKPOINT_MOUNT,
    checkpoint_pvc: str = "mask-rcnn-checkpoints",
    keep_checkpoints: bool = False,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "mask-rcnn",
    registered_model_name: str = "mask-rcnn",
    model_alias: str = "champion",
    min_map: float = 0.0,
    gate_key: str = "segm_mAP",
    evaluation_limit: int = 0,
    num_pictures: int = 4,
):
    """config_preset: a preset path in the image (configs/coco.yaml); config_yaml: the config as
    YAML text, used instead of the preset when not empty; config_overrides: KEY=VALUE strings.
    weights_source: gs://, https://, a path, or "none" (random init); weights_exclude: layers
    not loaded (the class-specific ones for another NUM_CLASSES).
    dataset_source: "shapes" or a COCO folder (annotations.json + images/, local or gs://);
    dataset_count: images to read (0 = all; shapes: 500). heads_epochs, total_epochs: the epoch
    each stage stops at; learning rates of 0 mean LEARNING_RATE (heads) and a tenth of it (all).
    min_map: the gate on gate_key that registers the model as registered_model_name ("" = do
    not register); the new version gets the alias model_alias ("champion"), a failed gate
    leaves the alias where it was. evaluation_limit: val images to evaluate (0 = all).
    workers: GPU pods per training stage; 1 runs each stage as one task with gpu_count GPUs,
    more as a TFJob of `workers` pods with gpu_count GPUs each (checkpoint_pvc: ReadWriteMany).
    keep_checkpoints: keep the run's checkpoint folder on the volume after evaluate succeeds
    (default: removed; the stages' final checkpoints stay as task artifacts)."""
    common = dict(config_preset=config_preset, config_yaml=config_yaml,
                  config_overrides=config_overrides,
                  mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment)

    # The cached tasks get only what decides their results (see resolve-config): a run that
    # changes training or MLflow settings reuses them; train-heads records them in MLflow.
    inputs = resolve_config(config_preset=config_preset, config_yaml=config_yaml,
                            config_overrides=config_overrides).set_display_name("resolve-config")
    weights = fetch_weights(source=weights_source, sha256=weights_sha256, exclude=weights_exclude,
                            model_config=inputs.outputs["model_config"]
                            ).set_display_name("fetch-weights")
    data = prepare_data(source=dataset_source, count=dataset_count, val_fraction=val_fraction,
                        image_size=inputs.outputs["image_size"]).set_display_name("prepare-data")
    for task in (inputs, weights, data):
        _with_tracking_env(_resources(task, **DATA_RESOURCES)).set_caching_options(True)

    # train-heads -> train-all -> evaluate, as one GPU task per stage or as TFJobs (README,
    # "Training on several GPU nodes"): a branch each, see the module's docstring.
    chain = dict(data=data, weights=weights, common=common, gpu_type=gpu_type,
                 gpu_count=gpu_count, workers=workers, checkpoint_root=checkpoint_root,
                 checkpoint_pvc=checkpoint_pvc, heads_epochs=heads_epochs,
                 heads_learning_rate=heads_learning_rate, total_epochs=total_epochs,
                 all_learning_rate=all_learning_rate, weights_exclude=weights_exclude,
                 evaluation_limit=evaluation_limit, min_map=min_map, gate_key=gate_key,
                 num_pictures=num_pictures, registered_model_name=registered_model_name,
                 model_alias=model_alias, keep_checkpoints=keep_checkpoints)
    with dsl.If(workers == 1, name="single-pod-training"):
        _train_chain(_single_pod_stage, **chain)
    with dsl.Else(name="tfjob-training"):
        _train_chain(_tfjob_stage, **chain)
