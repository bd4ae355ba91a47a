"""Distributed training: gradient clipping by the norm of the gradient summed over all replicas,
on two logical CPUs (each scenario runs in tests/engine/replicas.py, in a process of its own:
TensorFlow's devices are fixed when it starts)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def scenario(*args: str, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "tests.engine.replicas", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(w) for w in weights])


@pytest.mark.slow
def test_two_replicas_take_the_one_device_clipped_step():
    from tests.engine.replicas import CLIP, initial_weights

    report = scenario("clip")
    assert report["replicas"] == 2
    assert report["unclipped_norms"][0] > 10 * CLIP  # clipping is active
    two, one = flat(report["two_replicas"]), flat(report["one_replica"])
    assert np.abs(two - flat(initial_weights())).max() > 1e-2  # the steps moved the weights
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    # Keras' own clipping clips each replica's half before the sum: a different step, so
    # this test would catch a return to it.
    assert np.abs(flat(report["stock_keras_two_replicas"]) - one).max() > 1e-3


@pytest.mark.slow
def test_mask_rcnn_on_two_replicas_matches_one_device_with_two_images():
    """GPU_COUNT=2 x 1 image vs GPU_COUNT=1 x 2 images, same weights, same two images, the
    same seeded ROI sampling stream. Not bit-equal, for two reasons: each loss is a mean over
    the sampled anchors / ROIs of a replica, and the replicas' means are then averaged (one
    device averages over both images' at once: equal only when both images have equally
    many); and the ROI sampling draws [1, N] random numbers per replica instead of [2, N],
    so the second image's ROIs differ. Measured: total loss 87.84 vs 86.47 (1.6 %),
    gradient norm 1577 vs 1605 (1.8 %), gradient cosine 0.965; rpn_class_loss (exactly
    RPN_TRAIN_ANCHORS_PER_IMAGE anchors per image) equal to 1e-6."""
    report = scenario("mrcnn")
    free, clipped = report["unclipped"], report["clipped"]
    two, one = free["losses_two"], free["losses_one"]
    assert two["rpn_class_loss"] == pytest.approx(one["rpn_class_loss"], rel=1e-5)
    for name in ("loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss",
                 "mrcnn_mask_loss"):
        assert two[name] == pytest.approx(one[name], rel=0.1), name
    assert free["norm_two"] > 100 * 0.1  # so the 0.1 clip below is active
    assert free["norm_two"] == pytest.approx(free["norm_one"], rel=0.1)
    assert free["cosine"] > 0.9
    # Clipped to 0.1: the summed gradient's norm is clipped, so the two replicas' step has the
    # clip's norm (per-replica clipping would give up to twice it; 1e-3: float32 rounding of
    # weight + step) and one device's direction.
    assert clipped["norm_two"] == pytest.approx(0.1, rel=1e-3)
    assert clipped["cosine"] > 0.9


# === Several workers: two processes on 127.0.0.1 under MultiWorkerMirroredStrategy ===


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(*args: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Two worker processes (worker 0 is the chief: the cluster names no chief task) running
    `python -m tests.engine.replicas ARGS`, each with its TF_CONFIG."""
    hosts = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": json.dumps(tf_config),
                      "PYTHONPATH": os.pathsep.join(
                          [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tests.engine.replicas", *args], cwd=ROOT, env=worker_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes: list[subprocess.Popen], timeout: int = 600) -> list[dict]:
    """Each worker's JSON report once all exit 0; kills every one still running on failure."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
        for p, (out, err) in zip(processes, outputs):
            assert p.returncode == 0, err[-3000:]
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    finally:
        stop(processes)


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.slow
def test_two_workers_clip_as_one_device_and_resume_from_the_chiefs_checkpoint(tmp_path):
    """Two worker processes on 127.0.0.1. First the clipped steps of the tiny model (1 example
    per worker) equal one device's on both examples. Then each worker runs the pipeline's
    train task (train_stage) as a TFJob pod would; one is lost mid-epoch, both restart."""
    import tensorflow as tf

    from tests.engine.replicas import clipped_steps
    from trainer.data.prepare import prepare_dataset
    from trainer.stages import tracking
    from trainer.weights.h5layout import read_arrays, read_layout

    def weights_of(path):
        return read_arrays(path, read_layout(path).weighted_layers)

    data, probes = tmp_path / "data", tmp_path / "probes"
    prepare_dataset("shapes", data, count=8, image_size=64, val_fraction=0.25, shards=1,
                    workers=1, progress=False)
    probes.mkdir()
    args = ("worker-train", str(tmp_path), str(data), str(probes))

    # Worker 1 kills itself after the first step of epoch 2; the chief then waits for it in
    # the next all-reduce for ever, and is killed too (as a TFJob restarts all pods).
    workers = start_workers(*args, env={"MRCNN_TEST_KILL": "1"})
    try:
        code = workers[1].wait(timeout=600)
        assert code == -9, workers[1].stderr.read()[-3000:]
    finally:
        stop(workers)
    one_device = flat(clipped_steps(tf.distribute.get_strategy(), 2))
    for task in (0, 1):  # both workers hold the same weights: one device's
        steps = json.loads((probes / f"clip{task}.json").read_text())
        assert steps["replicas"] == 2
        np.testing.assert_allclose(flat(steps["weights"]), one_device, rtol=0, atol=1e-6)

    stage_dir = tmp_path / "shared" / "run-1" / "train-heads"
    [run] = list(stage_dir.iterdir())
    assert sorted(p.name for p in run.glob("mask_rcnn_*")) == [
        "mask_rcnn_demo_0001.h5", "mask_rcnn_demo_0001.optimizer.npz"]  # none of epoch 2
    saved_weights = weights_of(run / "mask_rcnn_demo_0001.h5")
    with np.load(run / "mask_rcnn_demo_0001.optimizer.npz") as state:
        saved_state = dict(state)

    reports = finish(start_workers(*args))
    for report in reports:
        assert report["epoch"] == 2 and report["checkpoint"] == "mask_rcnn_demo_0002.h5"
        assert np.isfinite(report["metrics"]["loss"])
    for task in (0, 1):  # both restarted with exactly the checkpoint's weights and state
        restored = weights_of(probes / f"worker{task}.h5")
        assert restored.keys() == saved_weights.keys()
        for name, values in saved_weights.items():
            for a, b in zip(restored[name], values, strict=True):
                np.testing.assert_array_equal(a, b)
        with np.load(probes / f"worker{task}.npz") as state:
            assert int(state["iterations"]) == int(saved_state["iterations"]) == 3
            slots = [k for k in saved_state if k.startswith("slot_")]
            assert slots and any(np.abs(saved_state[k]).sum() > 0 for k in slots)
            for key in slots:
                np.testing.assert_array_equal(state[key], saved_state[key])
    # Only the chief (worker 0) wrote: the shared run folder, its outputs, MLflow.
    assert [p.name for p in stage_dir.iterdir()] == [run.name]
    assert sorted(p.name for p in run.glob("*.h5")) == ["mask_rcnn_demo_0001.h5",
                                                        "mask_rcnn_demo_0002.h5"]
    assert sorted(p.name for p in (tmp_path / "out0").iterdir()) == [
        "config.yaml", "mask_rcnn_demo_0002.h5", "summary.json"]
    assert not (tmp_path / "out1").exists()
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("workers")
    [parent] = tracking.find_parent_runs(client, experiment.experiment_id, "run-1")
    runs = tracking.stage_runs(client, parent.info.run_id, experiment.experiment_id)
    # One stage run per chief start: the killed one never finished.
    assert sorted(r.info.status for r in runs) == ["FINISHED", "RUNNING"]


# === WORKERS and TF_CONFIG ===


def tf_config(kind: str, index: int, workers: int = 2, chief: int = 0) -> str:
    return json.dumps({"cluster": {"chief": ["c:1"] * chief, "worker": ["w:1"] * workers},
                       "task": {"type": kind, "index": index}})


def test_the_chief_is_the_chief_task_or_worker_0(monkeypatch):
    from trainer import Config
    from trainer.engine.strategy import cluster_task, is_chief

    config = Config(WORKERS=2)
    for text, chief in ((tf_config("worker", 0), True), (tf_config("worker", 1), False),
                        (tf_config("chief", 0, workers=1, chief=1), True),
                        (tf_config("worker", 0, workers=1, chief=1), False)):
        monkeypatch.setenv("TF_CONFIG", text)
        assert is_chief(config) is chief, text
    assert cluster_task(2) == ("worker", 0)
    monkeypatch.setenv("TF_CONFIG", tf_config("worker", 1, workers=4))  # ignored: one worker
    assert cluster_task(1) is None and is_chief(Config())


@pytest.mark.parametrize("text, problem", [
    (None, "TF_CONFIG is not set"),
    ("{not json", "not JSON with a cluster and a task"),
    (tf_config("worker", 0, workers=3), "its cluster has 3"),
    (tf_config("ps", 0), "task type 'ps' trains nothing"),
])
def test_workers_without_a_matching_tf_config_is_a_one_line_error(monkeypatch, text, problem):
    from trainer.engine.strategy import cluster_task
    from trainer.errors import UserError

    if text is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(UserError, match="WORKERS=2 needs TF_CONFIG") as raised:
        cluster_task(2)
    assert problem in str(raised.value) and "\n" not in str(raised.value)


def test_cli_train_with_workers_but_no_tf_config_exits_2(monkeypatch, capsys, tmp_path):
    from trainer.cli.main import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = main(["train", "--config", "configs/demo.yaml", "--set", "WORKERS=2", "--data",
                 str(tmp_path), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WORKERS=2 needs TF_CONFIG" in err
    assert main(["train", "--config", "configs/demo.yaml", "--set", "WORKERS=0", "--data",
                 str(tmp_path), "--epochs", "1"]) == 2
    assert "WORKERS must be at least 1, got 0" in capsys.readouterr().err


def test_a_worker_that_is_not_the_chief_continues_the_previous_stage_without_copying(
        tmp_path, demo_config):
    from trainer.stages.train import resolve_init
    from trainer.weights.h5layout import write_layout

    heads = tmp_path / "heads-model"
    write_layout(heads / "mask_rcnn_demo_0001.h5", {}, keras_version="3")
    (heads / "summary.json").write_text(json.dumps(
        {"log_dir": "/elsewhere/train-heads/demo20250101T1200"}))
    model_dir = tmp_path / "train-all"
    init, _ = resolve_init(str(heads), model_dir, demo_config, copy=False)
    assert init == str(heads / "mask_rcnn_demo_0001.h5")  # the same weights and epoch
    assert not model_dir.exists()  # the chief's copy is the only one
    init, _ = resolve_init(str(heads), model_dir, demo_config)
    assert init == str(model_dir / "demo20250101T1200" / "mask_rcnn_demo_0001.h5")
