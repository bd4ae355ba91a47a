"""Run as a script by tests/engine/test_distributed.py: TensorFlow's devices must be set up
before TensorFlow starts, so each scenario runs in a process of its own.

    python -m tests.engine.replicas clip              -> JSON: weights after 3 clipped steps on
                                                         2 replicas x 1 example, 1 x 2, and
                                                         2 x 1 with stock Keras clipping
    python -m tests.engine.replicas mrcnn DATA ARGS   -> JSON: Mask R-CNN loss and step norms,
                                                         GPU_COUNT=2 x 1 image vs 1 x 2
    python -m tests.engine.replicas worker-train ROOT DATA PROBE_DIR
                                                      -> JSON: train_stage's result, 2 epochs
                                                         on WORKERS=2, resumed from the last
                                                         checkpoint; the state it resumed with
                                                         saved to PROBE_DIR; worker 1 kills
                                                         itself mid-epoch 2 if MRCNN_TEST_KILL
                                                         (then first: the `clip` steps under
                                                         MultiWorkerMirroredStrategy, saved to
                                                         PROBE_DIR/clip<task>.json)

The single-process scenarios get two logical CPUs; a worker trains on its one CPU.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

CLIP = 0.05  # far below the gradient norms of the tiny problem: every step is clipped
STEPS = 3


def two_logical_cpus() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


def tiny_model():
    """A 4 -> 3 dense regression whose train_step IS the Mask R-CNN model's (its per-replica
    loss scaling and optimizer call), with a mean squared error as its loss."""
    from trainer.model.mask_rcnn import MaskRCNNTrainingModel

    class Tiny(keras.Model):
        train_step = MaskRCNNTrainingModel.train_step
        _update_trackers = MaskRCNNTrainingModel._update_trackers
        metrics = MaskRCNNTrainingModel.metrics
        weight_decay = 0.0

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.trackers = {"loss": keras.metrics.Mean(name="loss")}

        def call(self, x):
            return self.dense(x)

        def _task_losses(self, data, training: bool):
            x, y = data[:2]
            return tf.reduce_mean(tf.square(self(x, training=training) - y)), {}

    return Tiny()


def tiny_data():
    """6 examples in a fixed order; targets far from the initial outputs (large gradients)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = (rng.normal(size=(6, 3)) * 10).astype(np.float32)
    return x, y


def initial_weights():
    rng = np.random.default_rng(1)
    return [rng.normal(size=(4, 3)).astype(np.float32) * 0.1, np.zeros(3, np.float32)]


def several_workers_fit(model, strategy) -> None:
    from trainer.engine.training import fit_on_several_workers

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        fit_on_several_workers(model)


def clipped_steps(strategy, global_batch: int, optimizer_factory=None) -> list:
    """Weights after STEPS steps of the project's SGD (momentum 0.9, global clip CLIP) on
    global batches of `global_batch` examples, split over the strategy's replicas."""
    from trainer.config import Config
    from trainer.engine.training import make_optimizer

    config = Config(OPTIMIZER="sgd", GRADIENT_CLIP_NORM=CLIP, LEARNING_MOMENTUM=0.9)
    x, y = tiny_data()
    with strategy.scope():
        model = tiny_model()
        model(tf.zeros((1, 4)))
        model.set_weights(initial_weights())
        optimizer = (optimizer_factory or (lambda: make_optimizer(0.5, config)))()
        model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
    several_workers_fit(model, strategy)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    model.fit(data.with_options(options), epochs=1, steps_per_epoch=STEPS, shuffle=False,
              verbose=0)
    return [w.tolist() for w in model.get_weights()]


def unclipped_norms() -> list[float]:
    """The global norm of each step's full-batch gradient, were the steps unclipped: > CLIP
    shows clipping is active (the first step's weights are the initial ones)."""
    x, y = tiny_data()
    model = tiny_model()
    model(tf.zeros((1, 4)))
    model.set_weights(initial_weights())
    with tf.GradientTape() as tape:
        loss, _ = model._task_losses((x[:2], y[:2]), training=True)
    gradients = tape.gradient(loss, model.trainable_variables)
    return [float(tf.linalg.global_norm(gradients))]


def clip() -> dict:
    two_logical_cpus()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    mirrored = tf.distribute.MirroredStrategy(cpus)
    stock = clipped_steps(tf.distribute.MirroredStrategy(cpus), 2, lambda: keras.optimizers.SGD(
        0.5, momentum=0.9, global_clipnorm=CLIP))
    return {"replicas": mirrored.num_replicas_in_sync,
            "two_replicas": clipped_steps(mirrored, 2),
            "one_replica": clipped_steps(tf.distribute.get_strategy(), 2),
            "stock_keras_two_replicas": stock,
            "unclipped_norms": unclipped_norms()}


# Mask R-CNN at 64 px with a ResNet-18 and few ROIs; frozen BatchNorm statistics (TRAIN_BN
# false) so that a replica's image does not change the other's normalisation.
MRCNN = ["BACKBONE=resnet18", "NORM=batch", "TRAIN_BN=false", "IMAGE_MIN_DIM=64",
         "IMAGE_MAX_DIM=64", "RPN_ANCHOR_SCALES=[8, 16, 24, 32, 48]",
         "RPN_TRAIN_ANCHORS_PER_IMAGE=32", "PRE_NMS_LIMIT=200", "POST_NMS_ROIS_TRAINING=32",
         "TRAIN_ROIS_PER_IMAGE=16", "TOP_DOWN_PYRAMID_SIZE=32", "FPN_CLASSIF_FC_LAYERS_SIZE=32",
         "MAX_GT_INSTANCES=4", "MINI_MASK_SHAPE=[14, 14]", "OPTIMIZER=sgd",
         "LEARNING_MOMENTUM=0.0", "LR_WARMUP_STEPS=0", "PROPOSALS_INCLUDE_GT=true",
         "WEIGHT_DECAY=0.0001"]


def mrcnn_steps(model, batch: dict, weights: list, clips: tuple) -> list[dict]:
    """For each clip norm: one SGD step (rate 1, no momentum: the step IS the clipped
    gradient) of `model` from `weights` on the two images of `batch` (a global batch of 2,
    split over the model's replicas)."""
    from trainer.engine.training import make_optimizer

    keras_model, results = model.keras_model, []
    for clip in clips:
        with model.strategy.scope():
            keras_model.set_weights(weights)
            keras_model.compile(optimizer=make_optimizer(
                1.0, model.config.replace(GRADIENT_CLIP_NORM=clip)))
        keras.utils.set_random_seed(7)  # the same ROI sampling stream in both setups
        history = keras_model.fit(tf.data.Dataset.from_tensor_slices(batch).batch(2), epochs=1,
                                  steps_per_epoch=1, verbose=0)
        trainable = {id(v) for v in keras_model.trainable_variables}
        step = [after - before for after, before, v in zip(
            keras_model.get_weights(), weights, keras_model.weights) if id(v) in trainable]
        results.append({"losses": {k: float(v[0]) for k, v in history.history.items()},
                        "step": np.concatenate([d.ravel() for d in step])})
    return results


def mrcnn() -> dict:
    """GPU_COUNT=2 x 1 image vs GPU_COUNT=1 x 2 images from the same weights on the same two
    images: losses and unclipped gradient norms; and the two replicas' step clipped to 0.1
    (compared with one device's unclipped step: the direction)."""
    from trainer import Config, MaskRCNN
    from trainer.data import shapes
    from trainer.data.memory import examples_dataset

    two_logical_cpus()
    keras.utils.set_random_seed(0)
    config = Config.from_yaml("configs/demo.yaml", [*MRCNN, "IMAGES_PER_GPU=2"])
    samples = list(shapes.generate(2, seed=3, height=64, width=64, min_instances=2))
    batch = next(iter(examples_dataset(samples, config, shuffle=False, repeat=False)))
    batch = tf.nest.map_structure(lambda t: t.numpy(), batch)
    one_model = MaskRCNN("training", config)
    weights = one_model.keras_model.get_weights()
    [one] = mrcnn_steps(one_model, batch, weights, (1e9,))
    two = mrcnn_steps(MaskRCNN("training", config.replace(GPU_COUNT=2, IMAGES_PER_GPU=1)),
                      batch, weights, (1e9, 0.1))
    result = {}
    for name, a, b in (("unclipped", two[0], one), ("clipped", two[1], one)):
        cosine = float(a["step"] @ b["step"]
                       / (np.linalg.norm(a["step"]) * np.linalg.norm(b["step"])))
        result[name] = {"losses_two": a["losses"], "losses_one": b["losses"],
                        "norm_two": float(np.linalg.norm(a["step"])),
                        "norm_one": float(np.linalg.norm(b["step"])), "cosine": cosine}
    return result


def worker_train(root: str, data: str, probe_dir: str) -> dict:
    """What a TFJob pod runs: the pipeline's train task, two epochs, WORKERS=2; checkpoints
    in root/shared, MLflow in root/mlflow.db, the task's outputs in root/out<task>."""
    import signal
    from pathlib import Path

    from trainer.stages.tracking import TrackingSettings
    from trainer.stages.train import train_stage
    from trainer.weights.by_name import save_weights, weight_names
    from trainer.weights.checkpoints import save_optimizer_state

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

    class KillMidEpoch(keras.callbacks.Callback):
        """Worker 1 dies (SIGKILL: no cleanup) after the first step of epoch 2."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 0 and task == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    class Probe(keras.callbacks.Callback):
        """The weights and optimizer state training (re)starts from, as a checkpoint holds
        them."""

        def on_train_begin(self, logs=None):
            variables = self.model.trainable_variables
            save_optimizer_state(Path(probe_dir) / f"worker{task}.npz", self.model.optimizer,
                                 variables, weight_names(self.model, variables))
            save_weights(self.model, Path(probe_dir) / f"worker{task}.h5")

    if os.environ.get("MRCNN_TEST_KILL"):  # first start: 1(a) across the two processes
        from trainer import Config
        from trainer.engine.strategy import distribution_strategy

        strategy = distribution_strategy(Config(WORKERS=2))
        steps = {"replicas": strategy.num_replicas_in_sync,
                 "weights": clipped_steps(strategy, 2)}
        (Path(probe_dir) / f"clip{task}.json").write_text(json.dumps(steps))
    keras.utils.set_random_seed(0)
    return train_stage(
        config_preset="configs/demo.yaml", config_yaml="",
        overrides=[*MRCNN, "WORKERS=2", "IMAGES_PER_GPU=1", "STEPS_PER_EPOCH=3",
                   "VALIDATION_STEPS=0", "LEARNING_MOMENTUM=0.9", "GRADIENT_CLIP_NORM=1.0"],
        gpu_count=1, stage="train-heads", layers="all", epochs=2, learning_rate=0.01,
        lr_factor=1.0, dataset_dir=data, init_dir=None, exclude=[],
        checkpoint_root=f"{root}/shared", out_dir=f"{root}/out{task}",
        tracking=TrackingSettings(uri=f"sqlite:///{root}/mlflow.db", experiment="workers",
                                  pipeline_run_id="run-1"),
        keep_last=None,
        custom_callbacks=[Probe(), *([KillMidEpoch()] if os.environ.get("MRCNN_TEST_KILL")
                                     else [])])


if __name__ == "__main__":
    scenario = sys.argv[1]
    if scenario == "clip":
        result = clip()
    elif scenario == "mrcnn":
        result = mrcnn()
    elif scenario == "worker-train":
        result = worker_train(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(result))
