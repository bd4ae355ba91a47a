"""Fault injection: a full disk while a checkpoint is written leaves the previous one intact;
a training process killed (SIGKILL) in the middle of a checkpoint write resumes from the last
complete checkpoint with its weights and optimizer state exactly; leftovers are removed."""

from __future__ import annotations

import errno

import pytest

from tests.engine.test_checkpointing import tiny_model
from trainer.engine.training import EpochCheckpoint, NonFiniteLossGuard
from trainer.io import atomic
from trainer.weights.checkpoints import (
    checkpoint_path,
    find_last_checkpoint,
    optimizer_path,
    remove_leftovers,
)


@pytest.mark.parametrize("failing_write", [1, 2])  # 1: the optimizer state, 2: the weights
def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch,
                                                           failing_write):
    run = tmp_path / "demo20260101T1200"
    run.mkdir()
    callback = EpochCheckpoint(run, "demo", NonFiniteLossGuard())
    callback.set_model(tiny_model())
    callback.on_epoch_end(0)
    first = checkpoint_path(run, "demo", 1)
    saved = {path: path.read_bytes() for path in (first, optimizer_path(first))}

    fsync, writes = atomic._fsync, []

    def full_disk(path):
        if path.is_file():
            writes.append(path)
            if len(writes) == failing_write:
                raise OSError(errno.ENOSPC, "No space left on device")
        fsync(path)

    monkeypatch.setattr(atomic, "_fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        callback.on_epoch_end(1)
    monkeypatch.setattr(atomic, "_fsync", fsync)
    assert {path: path.read_bytes() for path in saved} == saved
    assert not checkpoint_path(run, "demo", 2).exists()
    assert not any(p.name.endswith(".part") for p in run.iterdir())  # the write cleaned up
    remove_leftovers(run, "demo")  # what the next train() does first
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in saved)
    assert find_last_checkpoint(tmp_path, "demo") == first


KILLED_MID_CHECKPOINT = """
import os, signal, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
from trainer import Config, MaskRCNN
from trainer.weights import h5layout

write_group, groups = h5layout._write_layer_group, []

def dying(root, layer, weights):  # SIGKILL halfway through epoch 2's weights file
    if int(root.attrs.get("epoch", 0)) == 2 and len(groups) > 20:
        os.kill(os.getpid(), signal.SIGKILL)
    if int(root.attrs.get("epoch", 0)) == 2:
        groups.append(layer)
    write_group(root, layer, weights)

h5layout._write_layer_group = dying
config = Config.from_yaml("configs/demo.yaml", sys.argv[3:])
model = MaskRCNN("training", config, model_dir=sys.argv[1])
model.train(sys.argv[2], None, learning_rate=0.001, epochs=3, layers="heads", verbose=0)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_exact_resume(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from tests.engine.test_training import SMALL, RecordOptimizerAtStart
    from trainer import Config, MaskRCNN
    from trainer.data.prepare import prepare_dataset
    from trainer.weights.h5layout import read_arrays, read_layout

    data = tmp_path / "data"
    prepare_dataset("shapes", data, count=4, image_size=128, val_fraction=0.0, shards=1,
                    workers=1, progress=False)
    runs = tmp_path / "runs"
    child = subprocess.run([sys.executable, "-c", KILLED_MID_CHECKPOINT, str(runs), str(data),
                            *SMALL], capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-3000:]
    [run] = list(runs.iterdir())
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("events"))
    assert "mask_rcnn_demo_0001.h5" in names and "mask_rcnn_demo_0002.h5" not in names
    assert "mask_rcnn_demo_0002.optimizer.npz" in names  # committed before its weights
    assert any(n.startswith(".mask_rcnn_demo_0002.h5.") for n in names)  # the cut write

    config = Config.from_yaml("configs/demo.yaml", SMALL)
    resumed = MaskRCNN("training", config, model_dir=runs)
    last = resumed.find_last()
    assert last == run / "mask_rcnn_demo_0001.h5"
    resumed.load_weights(last)
    layout = read_layout(last)
    saved = read_arrays(last, layout.weighted_layers)
    for name, arrays in saved.items():
        layer = resumed.keras_model.get_layer(name)
        for got, want in zip(layer.get_weights(), arrays, strict=False):
            np.testing.assert_array_equal(got, want)
    probe = RecordOptimizerAtStart()
    resumed.train(data, None, learning_rate=0.001, epochs=2, layers="heads",
                  custom_callbacks=[probe], verbose=0)
    with np.load(run / "mask_rcnn_demo_0001.optimizer.npz") as state:
        assert probe.iterations == int(state["iterations"]) == config.STEPS_PER_EPOCH
        for i, momentum in enumerate(probe.momentums):
            np.testing.assert_array_equal(momentum, state[f"slot_{i:05d}"])
    assert not any(p.name.endswith(".part") for p in run.iterdir())
    # The resumed run wrote epoch 2 whole.
    assert read_layout(run / "mask_rcnn_demo_0002.h5").weighted_layers
