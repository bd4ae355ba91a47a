"""Checkpoints written by training: the optimizer state committed before its weights, old
epochs deleted on request, a run folder of its own for every new run."""

from pathlib import Path

import keras
import numpy as np

from trainer import Config, MaskRCNN
from trainer.engine import training
from trainer.engine.training import EpochCheckpoint, NonFiniteLossGuard
from trainer.weights.checkpoints import checkpoint_path, optimizer_path


def tiny_model() -> keras.Model:
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_optimizer_state_is_committed_before_its_weights(tmp_path, monkeypatch):
    seen = []
    save_weights = training.save_weights

    def record(model, path, **kwargs):  # a kill here must find the state already complete
        seen.append(optimizer_path(path).is_file())
        save_weights(model, path, **kwargs)

    monkeypatch.setattr(training, "save_weights", record)
    callback = EpochCheckpoint(tmp_path, "Demo", NonFiniteLossGuard())
    callback.set_model(tiny_model())
    callback.on_epoch_end(0)
    assert seen == [True]
    assert checkpoint_path(tmp_path, "demo", 1).is_file()


def test_retention_keeps_the_newest_and_the_stage_start(tmp_path):
    model = tiny_model()
    start = checkpoint_path(tmp_path, "demo", 3)  # the previous stage's final, copied in
    training.save_weights(model, start)
    callback = EpochCheckpoint(tmp_path, "demo", NonFiniteLossGuard(), keep_last=2,
                               protected=[start])
    callback.set_model(model)
    for epoch in range(3, 8):  # epochs 4..8
        callback.on_epoch_end(epoch)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == [
        "mask_rcnn_demo_0003.h5", "mask_rcnn_demo_0007.h5", "mask_rcnn_demo_0008.h5"]
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        "mask_rcnn_demo_0007.optimizer.npz", "mask_rcnn_demo_0008.optimizer.npz"]


def test_new_runs_never_share_a_run_folder(tmp_path, monkeypatch):
    """Two runs started in the same minute (matterport named both {name}{YYYYmmddTHHMM})."""
    config = Config.from_yaml("configs/demo.yaml", ["STEPS_PER_EPOCH=1", "VALIDATION_STEPS=1"])
    monkeypatch.setattr(keras.Model, "fit", lambda self, *args, **kwargs: None)
    folders = []
    for _ in range(2):
        model = MaskRCNN("training", config, model_dir=tmp_path)
        samples = [np.zeros((1,))]  # a stand-in dataset: fit is stubbed
        model.train(_dataset(samples), None, learning_rate=0.01, epochs=1, layers="heads",
                    verbose=0)
        folders.append(model.log_dir)
    assert folders[0] != folders[1]
    assert all(Path(folder).parent == tmp_path and folder.is_dir() for folder in folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in folders)


def _dataset(samples):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(samples)
