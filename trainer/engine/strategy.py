"""The distribution strategy a config asks for: one device, MirroredStrategy over GPU_COUNT
devices, or (WORKERS > 1) MultiWorkerMirroredStrategy over the TF_CONFIG cluster, GPU_COUNT
devices on each worker. Which task is the chief (the one that writes) is decided here too."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from trainer.errors import UserError

TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host0:port", "host1:port"]}, '
                     '"task": {"type": "worker", "index": 0}}')

# One MultiWorkerMirroredStrategy per process: TensorFlow configures its collectives once.
_multi_worker: tf.distribute.MultiWorkerMirroredStrategy | None = None


def cluster_task(workers: int) -> tuple[str, int] | None:
    """This process's (task type, index) in TF_CONFIG's cluster, checked to hold `workers`
    chief + worker tasks; None when `workers` is 1 (TF_CONFIG is then ignored)."""
    found = _task_in_cluster(workers)
    return None if found is None else found[:2]


def _task_in_cluster(workers: int) -> tuple[str, int, dict] | None:
    """cluster_task's (type, index) and TF_CONFIG's cluster, TF_CONFIG read and checked once."""
    if workers == 1:
        return None
    text = os.environ.get("TF_CONFIG", "")

    def fail(problem: str) -> UserError:
        return UserError(f"WORKERS={workers} needs TF_CONFIG describing {workers} chief+worker "
                         f"tasks (the TFJob operator sets it; by hand e.g. {TF_CONFIG_EXAMPLE})"
                         f": {problem}")

    if not text:
        raise fail("TF_CONFIG is not set")
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config["task"]
        kind, index = str(task["type"]), int(task["index"])
        tasks = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise fail("it is not JSON with a cluster and a task {type, index}") from None
    if tasks != workers:
        raise fail(f"its cluster has {tasks}")
    if kind not in ("chief", "worker"):
        raise fail(f"task type {kind!r} trains nothing (chief or worker)")
    return kind, index, cluster


def is_chief(config) -> bool:
    """Whether this process writes checkpoints, TensorBoard logs and MLflow records: always
    with one worker; with several, the "chief" task, or worker 0 when the cluster names no
    chief (TensorFlow's rule)."""
    found = _task_in_cluster(config.WORKERS)
    if found is None:
        return True
    kind, index, cluster = found
    return kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))


def distribution_strategy(config) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when WORKERS > 1 (every local GPU of each worker, or its
    CPU), MirroredStrategy over GPU_COUNT devices (GPUs, or logical CPUs where there are
    none), or the default strategy for one device."""
    global _multi_worker
    if config.WORKERS > 1:
        cluster_task(config.WORKERS)
        if _multi_worker is None:
            _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()
        per_worker = _multi_worker.num_replicas_in_sync // config.WORKERS
        if per_worker != config.GPU_COUNT:
            raise UserError(f"GPU_COUNT={config.GPU_COUNT} but each of the {config.WORKERS} "
                            f"workers trains on {per_worker} device(s) (all its GPUs, or one "
                            "CPU): set GPU_COUNT to the GPUs per worker")
        return _multi_worker
    if config.GPU_COUNT == 1:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) < config.GPU_COUNT:
        raise UserError(f"GPU_COUNT={config.GPU_COUNT} but only {len(devices)} device(s) are "
                        "visible: lower GPU_COUNT or request more GPUs")
    return tf.distribute.MirroredStrategy([d.name for d in devices[: config.GPU_COUNT]])
