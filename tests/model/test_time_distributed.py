"""TimeDistributed folds ROIs into the batch; a convolution covering its whole input runs as
one MatMul. Both must give Keras's own convolution's outputs and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from trainer.model.time_distributed import TimeDistributed, covers_its_input


def _outputs_and_gradients(apply, inputs, variables):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = apply(inputs)
        loss = tf.reduce_sum(outputs * tf.cos(outputs))
    return outputs, tape.gradient(loss, [inputs, *variables])


@pytest.mark.parametrize(("kernel", "spatial", "activation"),
                         [(7, 7, None), (1, 1, "relu"), (3, 3, "tanh")])
def test_whole_input_convolution_is_a_matmul_with_the_convolutions_results(
        kernel, spatial, activation):
    rng = np.random.default_rng(0)
    inputs = tf.constant(rng.normal(size=(2, 5, spatial, spatial, 6)), tf.float32)
    wrapper = TimeDistributed(layers.Conv2D(4, kernel, activation=activation))
    wrapper.build(tuple(inputs.shape))
    wrapper.layer.bias.assign(rng.normal(size=4))
    assert covers_its_input(wrapper.layer, (10, spatial, spatial, 6))

    outputs, grads = _outputs_and_gradients(wrapper, inputs, wrapper.trainable_variables)
    assert outputs.shape == (2, 5, 1, 1, 4)
    # Keras's own convolution on the folded ROIs: the reference.
    expected, expected_grads = _outputs_and_gradients(
        lambda x: tf.reshape(wrapper.layer(tf.reshape(x, (10, spatial, spatial, 6))),
                             (2, 5, 1, 1, 4)),
        inputs, wrapper.trainable_variables)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    graph = tf.function(wrapper).get_concrete_function(inputs).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "MatMul" in op_types
    assert "Conv2D" not in op_types


@pytest.mark.parametrize(("conv", "spatial"), [
    (layers.Conv2D(4, 3, padding="same"), 3),       # padded: several windows
    (layers.Conv2D(4, 3), 5),                       # smaller than the input
    (layers.Conv2D(4, 3, dilation_rate=2), 5),
    (layers.Conv2DTranspose(4, 2, strides=2), 2),
])
def test_other_convolutions_keep_their_kernels(conv, spatial):
    assert not covers_its_input(conv, (10, spatial, spatial, 6))
    inputs = tf.random.normal((2, 5, spatial, spatial, 6))
    wrapper = TimeDistributed(conv)
    wrapper.build(tuple(inputs.shape))
    graph = tf.function(wrapper).get_concrete_function(inputs).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "MatMul" not in op_types
    outputs = wrapper(inputs)
    expected = conv(tf.reshape(inputs, (10, spatial, spatial, 6)))
    np.testing.assert_allclose(outputs, tf.reshape(expected, outputs.shape), rtol=1e-6,
                               atol=1e-6)


def test_bfloat16_policy_computes_in_bfloat16():
    inputs = tf.random.normal((1, 3, 7, 7, 8), dtype=tf.bfloat16)
    wrapper = TimeDistributed(layers.Conv2D(4, 7, dtype="mixed_bfloat16"), dtype="mixed_bfloat16")
    wrapper.build(tuple(inputs.shape))
    assert wrapper.layer.kernel.dtype == "float32"
    outputs = wrapper(inputs)
    assert outputs.dtype == tf.bfloat16
    reference = wrapper.layer(tf.reshape(inputs, (3, 7, 7, 8)))
    np.testing.assert_allclose(tf.cast(outputs, tf.float32)[0, :, 0, 0],
                               tf.cast(reference, tf.float32)[:, 0, 0], rtol=2e-2, atol=2e-2)
