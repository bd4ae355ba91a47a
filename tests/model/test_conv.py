"""trainer.model.conv.Conv2D: the weight gradient as one product over image patches where it
applies; outputs and every gradient must be Keras's own Conv2D's, and the RPN and FPN use it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

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


def _twin(layer_kwargs, input_shape, seed=0):
    """Our Conv2D and Keras's with the same weights, built for `input_shape`."""
    ours, keras_conv = conv.Conv2D(**layer_kwargs), layers.Conv2D(**layer_kwargs)
    ours.build(input_shape)
    keras_conv.build(input_shape)
    rng = np.random.default_rng(seed)
    for mine, theirs in zip(ours.weights, keras_conv.weights, strict=True):
        value = rng.normal(scale=0.05, size=tuple(mine.shape))
        mine.assign(value)
        theirs.assign(value)
    return ours, keras_conv


@pytest.mark.parametrize(("shape", "kernel", "activation"), [
    ((2, 32, 32, 256), 3, "relu"),       # the RPN / FPN case
    ((1, 33, 40, 256), 5, None),         # odd, not square, a wider kernel
])
def test_patch_gradient_equals_the_convolutions(shape, kernel, activation):
    kwargs = dict(filters=8, kernel_size=kernel, padding="same", activation=activation)
    ours, keras_conv = _twin(kwargs, shape)
    assert conv.patch_gradient_applies(ours, shape)
    rng = np.random.default_rng(1)
    inputs = tf.constant(rng.normal(size=shape), tf.float32)
    upstream = tf.constant(rng.normal(size=(*shape[:3], 8)), tf.float32)

    outputs, grads = _outputs_and_gradients(ours, inputs, upstream)
    expected, expected_grads = _outputs_and_gradients(keras_conv, inputs, upstream)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    assert len(grads) == 3  # input, kernel, bias
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
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
