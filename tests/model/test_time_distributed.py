"""TimeDistributed folds ROIs into the batch; a convolution covering its whole input runs as
one MatMul. Both must give Keras's own convolution's outputs and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from trainer.model import time_distributed
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


def _product_op_types(rows_shape, matrix_shape) -> set[str]:
    spec = (tf.TensorSpec(rows_shape), tf.TensorSpec(matrix_shape))
    graph = tf.function(time_distributed.matmul).get_concrete_function(*spec).graph
    return {op.type for op in graph.get_operations()}


def test_few_rows_times_a_wide_matrix_runs_by_column_blocks():
    rng = np.random.default_rng(3)
    rows = tf.constant(rng.normal(size=(12, 40)), tf.float32)
    matrix = tf.constant(rng.normal(size=(40, 512)), tf.float32)

    product, grads = _outputs_and_gradients(
        lambda x: time_distributed.matmul(x, matrix), rows, [])
    expected, expected_grads = _outputs_and_gradients(lambda x: tf.matmul(x, matrix), rows, [])
    np.testing.assert_allclose(product, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], expected_grads[0], rtol=1e-5, atol=1e-5)
    with tf.GradientTape() as tape:  # the matrix's gradient too
        tape.watch(matrix)
        got = tape.gradient(tf.reduce_sum(time_distributed.matmul(rows, matrix) ** 2), matrix)
    with tf.GradientTape() as tape:
        tape.watch(matrix)
        want = tape.gradient(tf.reduce_sum(tf.matmul(rows, matrix) ** 2), matrix)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # 512 columns: four products of 128 (the module docstring has the timings).
    assert "Split" in _product_op_types((256, 12544), (12544, 1024))
    assert "Split" in _product_op_types((12, 40), (40, 512))


@pytest.mark.parametrize(("rows_shape", "matrix_shape"), [
    ((384, 40), (40, 512)),     # enough rows: one product is as fast
    ((None, 40), (40, 512)),    # an unknown row count
    ((64, 6272), (6272, 256)),  # the demo preset's classifier: too narrow
    ((12, 40), (40, 520)),      # not a multiple of the block
])
def test_otherwise_one_matmul(rows_shape, matrix_shape):
    assert "Split" not in _product_op_types(rows_shape, matrix_shape)
