"""trainer.model.conv.Conv2D: the weight gradient as one product over image patches where it
applies; outputs and every gradient must be Keras's own Conv2D's, and the RPN and FPN use it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from trainer import Config, MaskRCNN
from trainer.model import conv
from trainer.model.fpn import fpn_graph
from trainer.model.rpn import build_rpn_model


def _outputs_and_gradients(layer, inputs, upstream):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs)
        loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
    return outputs, tape.gradient(loss, [inputs, *layer.trainable_variables])


def _gradient_op_types(layer, inputs) -> set[str]:
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x))
        return tape.gradient(y, [x, *layer.trainable_variables])
    graph = tf.function(step).get_concrete_function(inputs).graph
    return {op.type for op in graph.get_operations()}


def _twin(layer_kwargs, input_shape, seed=0, **ours_only):
    """Our Conv2D (with `ours_only` too) and Keras's with the same weights, built for
    `input_shape`."""
    ours = conv.Conv2D(**layer_kwargs, **ours_only)
    keras_conv = layers.Conv2D(**layer_kwargs)
    ours.build(input_shape)
    keras_conv.build(input_shape)
    rng = np.random.default_rng(seed)
    for mine, theirs in zip(ours.weights, keras_conv.weights, strict=True):
        value = rng.normal(scale=0.05, size=tuple(mine.shape))
        mine.assign(value)
        theirs.assign(value)
    return ours, keras_conv


def _assert_keras_results(ours, keras_conv, shape, seed):
    """Our layer's outputs and its three gradients (input, kernel, bias) equal Keras's on
    random inputs (distinct values everywhere) and upstream gradients; returns the inputs."""
    rng = np.random.default_rng(seed)
    inputs = tf.constant(rng.normal(size=shape), tf.float32)
    upstream = tf.constant(rng.normal(size=(*shape[:3], ours.filters)), tf.float32)
    outputs, grads = _outputs_and_gradients(ours, inputs, upstream)
    expected, expected_grads = _outputs_and_gradients(keras_conv, inputs, upstream)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    assert len(grads) == 3
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    return inputs


@pytest.mark.parametrize(("shape", "kernel", "activation"), [
    ((2, 32, 32, 256), 3, "relu"),       # the RPN / FPN case
    ((1, 33, 40, 256), 5, None),         # odd, not square, a wider kernel
])
def test_patch_gradient_equals_the_convolutions(shape, kernel, activation):
    kwargs = dict(filters=8, kernel_size=kernel, padding="same", activation=activation)
    ours, keras_conv = _twin(kwargs, shape)
    assert conv.patch_gradient_applies(ours, shape)
    inputs = _assert_keras_results(ours, keras_conv, shape, seed=1)
    # The product ran (a silent fallback to Keras's gradient would pass the checks above).
    op_types = _gradient_op_types(ours, inputs)
    assert {"ExtractImagePatches", "MatMul"} <= op_types
    assert "Conv2DBackpropFilter" not in op_types


@pytest.mark.parametrize(("kwargs", "shape"), [
    (dict(kernel_size=3, padding="same"), (1, 32, 32, 64)),              # too few channels
    (dict(kernel_size=3, padding="same"), (1, 16, 16, 256)),             # too small a map
    (dict(kernel_size=3, padding="same", strides=2), (1, 32, 32, 256)),
    (dict(kernel_size=3, padding="valid"), (1, 32, 32, 256)),
    (dict(kernel_size=1), (1, 32, 32, 256)),
    (dict(kernel_size=3, padding="same", dtype="mixed_bfloat16"), (1, 32, 32, 256)),
])
def test_elsewhere_it_is_keras_conv2d(kwargs, shape):
    ours, keras_conv = _twin(dict(filters=4, **kwargs), shape)
    assert not conv.patch_gradient_applies(ours, shape)
    inputs = tf.random.normal(shape, seed=2)
    upstream = tf.ones((1, *ours.compute_output_shape(shape)[1:]))
    outputs, grads = _outputs_and_gradients(ours, inputs, upstream)
    expected, expected_grads = _outputs_and_gradients(keras_conv, inputs, upstream)
    # The same ops as Keras's (bfloat16 included): equal, not merely close.
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert "ExtractImagePatches" not in _gradient_op_types(ours, inputs)


def test_rpn_and_fpn_output_convolutions_use_it_with_conv2d_weights():
    rpn = build_rpn_model(anchor_stride=1, anchors_per_location=3, depth=256)
    shared = rpn.get_layer("rpn_conv_shared")
    assert type(shared) is conv.Conv2D
    assert [w.path.split("/")[-1] for w in shared.weights] == ["kernel", "bias"]

    stages = [keras.Input((s, s, 64)) for s in (32, 16, 8, 4)]
    fpn = keras.Model(stages, fpn_graph(*stages, depth=256))
    for name in ("fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "fpn_c2p2"):
        assert type(fpn.get_layer(name)) is conv.Conv2D
    # Same weights as Keras's Conv2D: matterport's h5 loads by these names and shapes.
    assert fpn.get_layer("fpn_p2").kernel.shape == (3, 3, 256, 256)


def _sparse_upstream(shape, filters, live_pixels, seed=3):
    """An output gradient [N, H, W, filters] that is zero except at `live_pixels` pixels per
    image, corners included (their taps fall in the "same" padding)."""
    n, height, width = shape[:3]
    rng = np.random.default_rng(seed)
    upstream = np.zeros((n, height * width, filters), np.float32)
    for image in range(n):
        chosen = rng.choice(height * width, size=live_pixels - 2, replace=False)
        chosen = np.concatenate([chosen, [0, height * width - 1]])
        upstream[image, chosen] = rng.normal(size=(live_pixels, filters))
    return tf.constant(upstream.reshape(n, height, width, filters))


def _count_sparse_paths(monkeypatch) -> list:
    """Counts the gradients that took the sparse path (eager: tf.cond runs one branch only)."""
    taken = []
    original = conv.sparse_convolution_gradients

    def counting(*args):
        taken.append(1)
        return original(*args)

    monkeypatch.setattr(conv, "sparse_convolution_gradients", counting)
    return taken


@pytest.mark.parametrize(("shape", "kernel", "activation", "dtype"), [
    ((2, 12, 12, 16), 3, "relu", "float32"),   # the RPN case, small
    ((1, 9, 14, 8), 5, None, "float32"),       # not square, a wider kernel
    ((2, 6, 6, 8), 1, "relu", "float32"),      # 1x1
    ((2, 12, 12, 16), 3, "relu", "mixed_bfloat16"),
])
def test_sparse_output_gradient_equals_keras_gradients(monkeypatch, shape, kernel, activation,
                                                       dtype):
    kwargs = dict(filters=6, kernel_size=kernel, padding="same", activation=activation,
                  dtype=dtype)
    ours, keras_conv = _twin(kwargs, shape, sparse_output_gradient=True)
    inputs = tf.random.normal(shape, seed=4)
    upstream = _sparse_upstream(shape, 6, live_pixels=5)  # under a quarter of the pixels
    taken = _count_sparse_paths(monkeypatch)

    outputs, grads = _outputs_and_gradients(ours, inputs, upstream)
    expected, expected_grads = _outputs_and_gradients(keras_conv, inputs, upstream)
    assert taken == [1]
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-6)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    for got, want in zip(grads, expected_grads, strict=True):
        scale = float(tf.reduce_max(tf.abs(tf.cast(want, tf.float32))))
        np.testing.assert_allclose(tf.cast(got, tf.float32) / scale,
                                   tf.cast(want, tf.float32) / scale, atol=tolerance)


def test_dense_output_gradient_takes_the_dense_path(monkeypatch):
    shape = (2, 12, 12, 16)
    ours, keras_conv = _twin(dict(filters=6, kernel_size=3, padding="same"), shape,
                             sparse_output_gradient=True)
    inputs = tf.random.normal(shape, seed=5)
    live = int(conv.MAX_LIVE_FRACTION * 144) + 2  # just over the share, per image
    upstream = _sparse_upstream(shape, 6, live_pixels=live)
    taken = _count_sparse_paths(monkeypatch)

    _, grads = _outputs_and_gradients(ours, inputs, upstream)
    _, expected_grads = _outputs_and_gradients(keras_conv, inputs, upstream)
    assert taken == []
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_output_gradient_in_a_graph_and_without_live_pixels():
    """Under tf.function both branches are in the graph; the count picks one at run time. No
    live pixel at all (a level without a sampled anchor) gives zero gradients."""
    shape = (2, 12, 12, 16)
    ours, keras_conv = _twin(dict(filters=6, kernel_size=3, padding="same", activation="relu"),
                             shape, sparse_output_gradient=True)
    inputs = tf.random.normal(shape, seed=6)

    @tf.function
    def gradients(layer, upstream):
        return _outputs_and_gradients(layer, inputs, upstream)[1]

    for upstream in (_sparse_upstream(shape, 6, live_pixels=7),
                     _sparse_upstream(shape, 6, live_pixels=100),
                     tf.zeros((*shape[:3], 6))):
        for got, want in zip(gradients(ours, upstream), gradients(keras_conv, upstream),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert {"If", "StatelessIf"} & _gradient_op_types(ours, inputs)  # the run-time choice


def test_the_rpn_shared_conv_asks_for_it_unless_xla():
    config = Config.from_yaml("configs/demo.yaml", ["IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64"])
    for jit, expected in ((False, True), (True, False)):
        model = MaskRCNN("training", config.replace(JIT_COMPILE=jit)).keras_model
        shared = model.get_layer("rpn_model").get_layer("rpn_conv_shared")
        assert shared.sparse_output_gradient is expected
    assert build_rpn_model(1, 3, 256).get_layer("rpn_conv_shared").sparse_output_gradient is False
    restored = conv.Conv2D.from_config(shared.get_config() | {"sparse_output_gradient": True})
    assert restored.sparse_output_gradient is True


@pytest.mark.parametrize(("shape", "kernel"), [((1, 32, 32, 256), 3), ((1, 32, 48, 256), 5)])
def test_one_image_runs_its_forward_by_tiles_with_keras_results(shape, kernel):
    kwargs = dict(filters=8, kernel_size=kernel, padding="same", activation="relu")
    ours, keras_conv = _twin(kwargs, shape)
    assert conv.tiles_apply(ours, shape)
    # Distinct values everywhere: a tile cut one pixel off, a missing border or quadrants put
    # back in the wrong place change the outputs.
    inputs = _assert_keras_results(ours, keras_conv, shape, seed=3)
    graph = tf.function(ours).get_concrete_function(inputs).graph
    [convolution] = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert convolution.inputs[0].shape[0] == 4  # the four quadrants, one batch


@pytest.mark.parametrize("shape", [(2, 32, 32, 256),   # two images: no faster by tiles
                                   (1, 33, 32, 256),   # odd height
                                   (1, 16, 16, 256),   # too small a map
                                   (1, 32, 32, 64)])   # too few channels
def test_tiles_only_for_one_image_of_even_size(shape):
    ours, _ = _twin(dict(filters=4, kernel_size=3, padding="same"), shape)
    assert not conv.tiles_apply(ours, shape)
    graph = tf.function(ours).get_concrete_function(tf.zeros(shape)).graph
    assert [op.inputs[0].shape[0] for op in graph.get_operations()
            if op.type == "Conv2D"] == [shape[0]]
