"""The training procedure: layer selection, optimizer semantics, checkpoints, exact resume."""

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Config, MaskRCNN
from trainer.data import shapes
from trainer.data.memory import examples_dataset
from trainer.engine.training import (
    LAYER_REGEX,
    ReleaseFreedHeap,
    TrainingDivergedError,
    clip_by_global_norm,
    make_optimizer,
    release_freed_heap,
    resolve_layers,
    set_trainable,
)
from trainer.errors import UserError
from trainer.model.losses import add_weight_decay_gradients, weight_decay_loss
from trainer.weights.checkpoints import optimizer_path

# The demo preset, narrowed where it does not change what is tested: fewer weights to trace;
# with matterport's architecture and SGD, whose semantics these tests check.
SMALL = ["FPN_CLASSIF_FC_LAYERS_SIZE=128", "TOP_DOWN_PYRAMID_SIZE=64", "STEPS_PER_EPOCH=2",
         "VALIDATION_STEPS=1", "TRAIN_ROIS_PER_IMAGE=16", "POST_NMS_ROIS_TRAINING=64",
         "BACKBONE=resnet50", "NORM=batch", "OPTIMIZER=sgd", "LR_WARMUP_STEPS=0",
         "PROPOSALS_INCLUDE_GT=false"]


def small_config(*extra: str) -> Config:
    return Config.from_yaml("configs/demo.yaml", [*SMALL, *extra])


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers holding weights, nested models flattened (their layers keep their own names)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += weighted_layers(layer)
        elif layer.weights:
            found.append(layer)
    return found


def weighted_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in weighted_layers(model)]


def test_layer_selections_follow_matterport(capsys):
    model = MaskRCNN("training", small_config()).keras_model
    all_layers = weighted_names(model)
    heads = set_trainable(model, resolve_layers("heads"))
    assert "In model: rpn_model" in capsys.readouterr().out
    expected_heads = [n for n in all_layers if n.startswith(("mrcnn_", "rpn_", "fpn_"))]
    assert sorted(heads) == sorted(expected_heads)
    assert {"rpn_conv_shared", "fpn_c5p5", "mrcnn_mask", "mrcnn_class_bn1"} <= set(heads)
    # TimeDistributed: the wrapper's name decides, the inner layer holds the weights.
    assert model.get_layer("mrcnn_class_conv1").layer.trainable
    assert not model.get_layer("res5c_branch2c").trainable

    four_up = set_trainable(model, resolve_layers("4+"), verbose=0)
    assert sorted(four_up) == sorted(
        n for n in all_layers if n.startswith(("res4", "bn4", "res5", "bn5")) or n in heads)
    assert "res4a_branch2a" in four_up and "res3d_branch2c" not in four_up
    assert sorted(set_trainable(model, resolve_layers("all"), verbose=0)) == sorted(all_layers)
    # A custom regex matches whole names only.
    assert set_trainable(model, resolve_layers("mrcnn_mask"), verbose=0) == ["mrcnn_mask"]
    with pytest.raises(Exception, match="neither one of heads"):
        resolve_layers("mrcnn_(")


def test_one_step_changes_only_the_selected_layers():
    config = small_config("TRAIN_BN=false")
    model = MaskRCNN("training", config)
    keras_model = model.keras_model
    selected = set(set_trainable(keras_model, LAYER_REGEX["4+"], verbose=0))
    keras_model.compile(optimizer=make_optimizer(0.01, config))
    owner = {w.path: layer.name for layer in weighted_layers(keras_model) for w in layer.weights}
    samples = list(shapes.generate(2, seed=5, height=128, width=128))
    batch = next(iter(examples_dataset(samples, config)))
    before = {v.path: v.numpy().copy() for v in keras_model.weights}
    keras_model.train_on_batch(batch)

    after = {v.path: v.numpy() for v in keras_model.weights}
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    owners = {owner[path] for path in changed}
    assert owners <= selected, owners - selected
    # The RPN losses always have anchors to learn from (the heads need positive proposals,
    # which an untrained RPN may not give): these layers must have moved.
    assert {"res4a_branch2a", "res5c_branch2c", "fpn_p2", "rpn_conv_shared"} <= owners
    # TRAIN_BN false: no moving statistic moves, not even in trainable BatchNorm layers.
    assert not any(p.endswith(("moving_mean", "moving_variance")) for p in changed)
    assert any(p.endswith("bn4a_branch2a/gamma") for p in changed)  # but gamma/beta train


def test_weight_decay_matches_hand_computation_and_skips_gamma_beta():
    dense = keras.layers.Dense(2, name="d")
    dense.build((None, 3))
    dense.kernel.assign(np.arange(6, dtype=np.float32).reshape(3, 2))
    dense.bias.assign([1.0, -3.0])
    norm = keras.layers.BatchNormalization(name="bn")
    norm.build((None, 2))
    norm.gamma.assign([5.0, 5.0])
    variables = dense.trainable_weights + norm.trainable_weights
    # kernel: 1e-2 * (0+1+4+9+16+25) / 6; bias: 1e-2 * (1 + 9) / 2; gamma and beta skipped
    expected = 1e-2 * 55 / 6 + 1e-2 * 10 / 2
    np.testing.assert_allclose(weight_decay_loss(variables, 1e-2).numpy(), expected, rtol=1e-6)


def _decay_fixture():
    """A dense layer on the loss's path, one off it, and a BatchNorm: (variables, task loss)."""
    used, unused = keras.layers.Dense(2, name="used"), keras.layers.Dense(2, name="unused")
    norm = keras.layers.BatchNormalization(name="bn")
    for layer in (used, unused, norm):
        layer.build((None, 3) if layer is not norm else (None, 2))
    rng = np.random.default_rng(0)
    for variable in used.weights + unused.weights + norm.trainable_weights:
        variable.assign(rng.normal(size=tuple(variable.shape)))
    x = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    variables = used.trainable_weights + unused.trainable_weights + norm.trainable_weights
    return variables, lambda: tf.reduce_sum(norm(used(x), training=True) ** 2)


@pytest.mark.parametrize("in_a_graph", [False, True])
def test_weight_decay_gradients_equal_the_l2_terms_through_the_tape(in_a_graph):
    variables, task_loss = _decay_fixture()
    scale = 4.0  # a loss scale (float16) over 2 replicas, say

    def both():
        with tf.GradientTape(persistent=True) as tape:
            task = task_loss()
            whole = scale * (task + weight_decay_loss(variables, 1e-2))
            scaled_task = scale * task
        expected = tape.gradient(whole, variables)
        got = add_weight_decay_gradients(tape.gradient(scaled_task, variables), variables,
                                         1e-2, scale=tf.constant(scale))
        return expected, got

    expected, got = tf.function(both)() if in_a_graph else both()
    names = [v.path for v in variables]
    assert [g is None for g in got] == [g is None for g in expected]
    assert got[2] is not None  # off the loss's path: the L2 term alone
    for name, want, have in zip(names, expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, err_msg=name)
    # The decay moved the weights' gradients and left gamma and beta's alone.
    task_only = add_weight_decay_gradients(list(expected), variables, 0.0)
    assert all(a is b for a, b in zip(task_only, expected, strict=True))


def test_train_step_decays_like_matterports_l2_in_the_loss():
    """One SGD step (no momentum, no clipping) of the training model's own train_step with
    WEIGHT_DECAY: the weights move by the gradient of the task loss plus the L2 term."""
    from tests.engine.replicas import initial_weights, tiny_data, tiny_model

    x, y = tiny_data()
    model = tiny_model()
    model.weight_decay = 0.1
    model(tf.zeros((1, 4)))
    model.set_weights(initial_weights())
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    with tf.GradientTape() as tape:
        loss = (model._task_losses((x, y), training=True)[0]
                + weight_decay_loss(model.trainable_variables, 0.1))
    gradients = tape.gradient(loss, model.trainable_variables)
    expected = [w - 0.05 * g.numpy() for w, g in zip(initial_weights(), gradients, strict=True)]
    logs = model.train_on_batch(x, y, return_dict=True)
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logs["loss"], loss.numpy(), rtol=1e-5)


def test_gradients_are_clipped_by_their_global_norm():
    config = Config(GRADIENT_CLIP_NORM=5.0, LEARNING_MOMENTUM=0.9)
    a, b = tf.Variable([0.0, 0.0]), tf.Variable([0.0])
    optimizer = make_optimizer(0.1, config)
    optimizer.apply([tf.constant([300.0, 400.0]), tf.constant([1200.0])], [a, b])
    # global norm 1300 -> scaled to 5: the step moves lr * 5 in total, not 5 per variable.
    step = np.concatenate([a.numpy(), b.numpy()])
    np.testing.assert_allclose(np.linalg.norm(step), 0.1 * 5.0, rtol=1e-5)
    np.testing.assert_allclose(step, -0.1 * 5.0 * np.array([3, 4, 12]) / 13, rtol=1e-5)


def test_sgd_momentum_runs_in_place_with_keras_arithmetic():
    """Our SGD's fused per-variable update, traced, takes Keras's SGD steps exactly."""
    config = Config(GRADIENT_CLIP_NORM=5.0, LEARNING_MOMENTUM=0.9)
    rng = np.random.default_rng(0)
    grads = [[tf.constant(rng.normal(size=shape), tf.float32) for shape in ((3, 2), (2,))]
             for _ in range(3)]
    reference = keras.optimizers.SGD(0.1, momentum=0.9, global_clipnorm=5.0)
    ours = make_optimizer(0.1, config)
    expected = [tf.Variable(tf.ones((3, 2))), tf.Variable(tf.zeros((2,)))]
    got = [tf.Variable(tf.ones((3, 2))), tf.Variable(tf.zeros((2,)))]
    traced = tf.function(lambda g: ours.apply(g, got))
    for step in grads:
        reference.apply(step, expected)
        traced(step)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    kinds = {op.type for op in traced.get_concrete_function(grads[0]).graph.get_operations()}
    assert "ResourceApplyKerasMomentum" in kinds


@pytest.mark.parametrize("values", [
    [[300.0, 400.0], None, [1200.0]],  # norm 1300: scaled down to 5
    [[0.3, 0.4], [1.2], None],         # norm 1.3: left as it is
    [[np.nan, 1.0], [2.0]],            # Keras makes them all NaN
])
def test_clip_by_global_norm_is_keras_s(values):
    from keras.src.optimizers.base_optimizer import clip_by_global_norm as keras_clip

    gradients = [None if v is None else tf.constant(v, tf.float32) for v in values]
    got = clip_by_global_norm(gradients, 5.0)
    want = keras_clip(gradients, 5.0)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6)
    # The optimizers clip with it: one L2Loss pass per gradient, no squared copies.
    optimizer = make_optimizer(0.1, Config(GRADIENT_CLIP_NORM=5.0, LEARNING_MOMENTUM=0.9))
    variables = [tf.Variable(tf.zeros_like(g)) for g in gradients if g is not None]
    present = [g for g in gradients if g is not None]
    graph = tf.function(lambda g: optimizer.apply(g, variables)).get_concrete_function(
        present).graph
    kinds = [op.type for op in graph.get_operations()]
    assert kinds.count("L2Loss") == len(present) and "Square" not in kinds


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt("simulated preemption")


class RecordOptimizerAtStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        self.iterations = int(optimizer.iterations.numpy())
        self.momentums = [optimizer.momentums[optimizer._get_variable_index(v)].numpy()
                          for v in self.model.trainable_variables]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from trainer.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("shapes", out, count=12, image_size=128, val_fraction=0.25, shards=1,
                    workers=1, progress=False)
    return out


@pytest.mark.slow
def test_interrupt_resume_exactly_then_stop_on_divergence(tmp_path, shapes_data):
    config = small_config()
    first = MaskRCNN("training", config, model_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        first.train(shapes_data, shapes_data, learning_rate=0.001, epochs=3, layers="heads",
                    augmentation={"fliplr": 0.5}, custom_callbacks=[InterruptAfterFirstEpoch()],
                    verbose=0)
    # A run that died before its first checkpoint must not hide the real one.
    (tmp_path / "demo29990101T0000").mkdir()
    resumed = MaskRCNN("training", config, model_dir=tmp_path)
    last = resumed.find_last()
    assert last.name == "mask_rcnn_demo_0001.h5"
    resumed.load_weights(last)
    assert resumed.epoch == 1 and resumed.log_dir == last.parent
    np.testing.assert_array_equal(resumed.keras_model.get_layer("mrcnn_mask").get_weights()[0],
                                  first.keras_model.get_layer("mrcnn_mask").get_weights()[0])

    probe = RecordOptimizerAtStart()
    history = resumed.train(shapes_data, shapes_data, learning_rate=0.001, epochs=3,
                            layers="heads", custom_callbacks=[probe], verbose=0)
    assert history.epoch == [1, 2]  # 0-based: epochs 2 and 3
    assert resumed.epoch == 3
    assert sorted(p.name for p in last.parent.glob("*.h5")) == [
        "mask_rcnn_demo_0001.h5", "mask_rcnn_demo_0002.h5", "mask_rcnn_demo_0003.h5"]
    with np.load(optimizer_path(last)) as saved:
        assert probe.iterations == int(saved["iterations"]) == config.STEPS_PER_EPOCH
        for i, momentum in enumerate(probe.momentums):
            np.testing.assert_array_equal(momentum, saved[f"slot_{i:05d}"])
        assert any(np.abs(saved[f"slot_{i:05d}"]).sum() > 0 for i in range(len(probe.momentums)))
    assert {"loss", "val_loss", "mrcnn_mask_loss", "val_rpn_class_loss"} <= set(history.history)

    # A learning rate that blows up: training stops with a clear error, epoch 3 stays intact.
    good = last.parent / "mask_rcnn_demo_0003.h5"
    before = good.read_bytes()
    with pytest.raises(TrainingDivergedError, match=r"loss became .* epoch 4.*mask_rcnn_demo_0003"):
        resumed.train(shapes_data, None, learning_rate=1e30, epochs=5, layers="heads", verbose=0)
    assert good.read_bytes() == before
    assert not (last.parent / "mask_rcnn_demo_0004.h5").exists()


MIRRORED = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from trainer import Config, MaskRCNN
    config = Config.from_yaml("configs/demo.yaml", sys.argv[2:])
    model = MaskRCNN("training", config, model_dir=sys.argv[1])
    history = model.train(sys.argv[1] + "/data", None, learning_rate=0.001, epochs=1,
                          layers="heads", verbose=0)
    print(json.dumps({"replicas": model.strategy.num_replicas_in_sync,
                      "loss": history.history["loss"],
                      "checkpoints": sorted(p.name for p in model.log_dir.glob("*.h5"))}))
""")


@pytest.mark.slow
def test_gpu_count_two_trains_with_mirrored_strategy_on_two_cpus(tmp_path, shapes_data):
    import shutil

    shutil.copytree(shapes_data, tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(tmp_path), *SMALL, "GPU_COUNT=2", "IMAGES_PER_GPU=1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert all(np.isfinite(report["loss"]))
    assert report["checkpoints"] == ["mask_rcnn_demo_0001.h5"]


def test_cli_train_rejects_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    from trainer.cli.main import main

    code = main(["train", "--config", "configs/demo.yaml", "--data", str(tmp_path / "nope"),
                 "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a prepared dataset" in err


def test_precise_bn_averages_batch_statistics_of_trainable_norms_only():
    from trainer.engine.training import recompute_bn_statistics
    from trainer.model.batch_norm import BatchNorm

    inputs = keras.Input((2,))
    live = BatchNorm(train_bn=True, name="live")
    frozen = BatchNorm(train_bn=False, name="frozen")
    model = keras.Model(inputs, [live(inputs), frozen(inputs)])
    batches = [np.array([[0.0, 10.0], [2.0, 10.0]], np.float32),   # means (1, 10), vars (1, 0)
               np.array([[2.0, 20.0], [4.0, 20.0]], np.float32)]   # means (3, 20), vars (1, 0)
    assert recompute_bn_statistics(model, batches, steps=2) == 1
    np.testing.assert_allclose(live.moving_mean.numpy(), [2.0, 15.0])
    np.testing.assert_allclose(live.moving_variance.numpy(), [1.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), [0.0, 0.0])
    assert live.momentum == 0.99  # restored


def test_precise_bn_callback_runs_at_epoch_end_unless_training_diverged():
    from trainer.engine.training import NonFiniteLossGuard, PreciseBatchNorm
    from trainer.model.batch_norm import BatchNorm

    inputs = keras.Input((1,))
    norm = BatchNorm(train_bn=True)
    model = keras.Model(inputs, norm(inputs))
    guard = NonFiniteLossGuard()
    callback = PreciseBatchNorm(iter([np.array([[1.0], [3.0]], np.float32)] * 4), guard, steps=2)
    callback.set_model(model)
    guard.tripped = (1, 1, float("nan"))
    callback.on_epoch_end(0)
    assert norm.moving_mean.numpy()[0] == 0.0  # a diverged epoch is never recomputed or saved
    guard.tripped = None
    callback.on_epoch_end(0)
    np.testing.assert_allclose(norm.moving_mean.numpy(), [2.0])


def test_learning_rate_defaults_are_decided_in_one_place():
    from trainer.engine.training import learning_rate_for

    config = Config(LEARNING_RATE=0.02)
    assert learning_rate_for(config) == 0.02  # 0: the config's LEARNING_RATE
    assert learning_rate_for(config, 0.0, 0.1) == pytest.approx(0.002)  # all layers: a tenth
    assert learning_rate_for(config, 0.005, 0.1) == 0.005  # a given rate is taken as it is
    with pytest.raises(UserError, match="positive, or 0"):
        learning_rate_for(config, -1.0)


def test_validation_steps_zero_means_no_validation(tmp_path, shapes_data, monkeypatch):
    # Keras 3 reads validation_steps=0 as "until the data ends": on the repeated validation
    # set, never. VALIDATION_STEPS=0 must mean no validation at all.
    seen = {}

    def fake_fit(self, *args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    model = MaskRCNN("training", small_config("VALIDATION_STEPS=0"), model_dir=tmp_path)
    monkeypatch.setattr(type(model.keras_model), "fit", fake_fit)
    with pytest.raises(KeyboardInterrupt):
        model.train(shapes_data, shapes_data, learning_rate=0.001, epochs=1, layers="heads",
                    verbose=0)
    assert seen["validation_data"] is None and seen["validation_steps"] is None


def test_warmup_and_cosine_schedule_by_global_step():
    from trainer.engine.training import WarmupCosineSchedule

    schedule = WarmupCosineSchedule(0.1, warmup_steps=4, decay_steps=10)
    rates = [float(schedule(step)) for step in (0, 1, 3, 5, 10, 20)]
    # warm-up (step + 1) / 4, times the cosine factor 0.5 (1 + cos(pi step / 10))
    expected = [0.1 * 0.25 * 1.0, 0.1 * 0.5 * 0.5 * (1 + np.cos(np.pi * 0.1)),
                0.1 * 0.5 * (1 + np.cos(np.pi * 0.3)), 0.05, 0.0, 0.0]
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-8)
    # A later stage continues the schedule: start_step counts the earlier epochs' steps.
    later = WarmupCosineSchedule(0.1, warmup_steps=4, decay_steps=10, start_step=5)
    assert float(later(0)) == pytest.approx(0.05)


def test_optimizer_choices():
    sgd = make_optimizer(0.01, small_config())
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.global_clipnorm == 5.0
    adam = make_optimizer(0.001, small_config("OPTIMIZER=adam", "LR_WARMUP_STEPS=10"))
    assert isinstance(adam, keras.optimizers.Adam)
    assert float(adam.learning_rate) == pytest.approx(0.0001)  # step 0 of 10 warm-up steps
    adamw = make_optimizer(0.001, small_config("OPTIMIZER=adamw", "WEIGHT_DECAY=0.05"))
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.05
    # AdamW decays the weights itself: the model adds no L2 term then.
    assert MaskRCNN("training", small_config("OPTIMIZER=adamw")).keras_model.weight_decay == 0.0


@pytest.mark.slow
def test_adam_state_is_checkpointed_and_restored(tmp_path, shapes_data):
    config = small_config("OPTIMIZER=adam", "LR_WARMUP_STEPS=3", "VALIDATION_STEPS=0")
    first = MaskRCNN("training", config, model_dir=tmp_path)
    first.train(shapes_data, None, learning_rate=0.001, epochs=1, layers="heads", verbose=0)
    resumed = MaskRCNN("training", config, model_dir=tmp_path)
    resumed.load_weights(resumed.find_last())
    seen = {}
    probe = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.update(
        iterations=int(resumed.keras_model.optimizer.iterations.numpy()),
        first_moment=resumed.keras_model.optimizer._momentums[0].numpy()))
    resumed.train(shapes_data, None, learning_rate=0.001, epochs=2, layers="heads",
                  custom_callbacks=[probe], verbose=0)
    with np.load(optimizer_path(first.resume_from)) as saved:
        assert seen["iterations"] == int(saved["iterations"]) == config.STEPS_PER_EPOCH
        np.testing.assert_array_equal(seen["first_moment"], saved["slot_00000"])
        slots = [k for k in saved.files if k.startswith("slot_")]
        assert len(slots) == 2 * len(first.keras_model.trainable_variables)  # m and v


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_heap_returns_freed_heap_pages_to_the_system():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # below malloc's mmap threshold: from the heap
    blocks = [libc.malloc(block) for _ in range(2400)]  # 150 MB
    guard = libc.malloc(block)  # above them: free() cannot give them back by shrinking the top
    for address in blocks:
        ctypes.memset(address, 1, block)  # resident
    for address in blocks:
        libc.free(address)
    before = _rss_mb()
    assert release_freed_heap()
    assert before - _rss_mb() > 100
    libc.free(guard)


def test_release_freed_heap_callback_runs_after_each_fits_first_step_and_validation():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((12, 3), np.float32), np.zeros((12, 1), np.float32)
    callback = ReleaseFreedHeap()
    model.fit(x, y, batch_size=4, epochs=2, validation_data=(x, y), callbacks=[callback],
              verbose=0)
    assert callback.releases == 1 + 2  # the first of 6 steps, 2 validations
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[callback], verbose=0)
    assert callback.releases == 4
