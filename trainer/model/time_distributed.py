"""TimeDistributed that folds the ROI axis into the batch.

Keras 3's TimeDistributed maps the wrapped layer over the time axis (`vectorized_map`), which
on CPU runs the classifier's 7x7 "fully connected" convolution ~35x slower than one call on
[batch * rois, ...]. Same weights, same names, same results: only the execution differs.

A convolution whose kernel covers its whole input (matterport's `mrcnn_class_conv1`, 7x7 on
7x7 pooled ROIs, and `mrcnn_class_conv2`, 1x1 on 1x1) is a matrix product: it runs as one
MatMul on the flattened ROIs with the kernel reshaped to [kh * kw * in, out]. oneDNN's
convolution would reorder that 50 MB kernel into its blocked layout twice a training step
(forward and input gradient), about 5 % of the 256 px step; MatMul reads it as it is.

oneDNN's sgemm multiplies few rows by a wide matrix slowly on this 2-core AVX2 machine: the
256 px step's [256, 12544] @ [12544, 1024] takes 74-81 ms (~85 GFLOP/s), the same product as
eight [12544, 128] column blocks 44-48 ms, while its two gradient products run at 145-160
GFLOP/s as they are. So below `MAX_BLOCKED_ROWS` rows and from `MIN_BLOCKED_COLUMNS` output
columns the forward product runs by column blocks (`matmul`), measured (ms, plain / blocks):
[256, 1024] @ [1024, 1024] 8.3 / 5.8; [256, 12544] @ [12544, 512] 33 / 26; [200, 12544] @
[12544, 1024] 61 / 37; but [64, 6272] @ [6272, 256] (the demo preset) 2.4 / 3.7 and from 384
rows up plain is as fast or faster (detect()'s 1000 ROIs: 166 / 168).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from trainer.model.devices import accelerator_present

BLOCK_COLUMNS = 128
MAX_BLOCKED_ROWS = 384  # exclusive
MIN_BLOCKED_COLUMNS = 512


@keras.saving.register_keras_serializable(package="mrcnn")
class TimeDistributed(keras.layers.TimeDistributed):
    """Applies `layer` to all [batch, rois, ...] slices at once: [B, R, ...] -> [B, R, ...]."""

    def call(self, inputs, training=None, mask=None):
        shape = tf.shape(inputs)
        folded = tf.reshape(inputs, tf.concat([[-1], shape[2:]], axis=0))
        if covers_its_input(self.layer, folded.shape):
            outputs = convolve_as_matmul(self.layer, folded)
        else:
            kwargs = {"training": training} if self.layer._call_has_training_arg else {}
            outputs = self.layer.call(folded, **kwargs)
        unfolded = tf.reshape(outputs, tf.concat([shape[:2], tf.shape(outputs)[1:]], axis=0))
        return tf.ensure_shape(unfolded, self.compute_output_shape(tuple(inputs.shape)))


def covers_its_input(layer, input_shape) -> bool:
    """Whether `layer` is a plain Conv2D whose one valid window is its whole [N, H, W, C]
    input: one output pixel per example, each a dot product with the whole kernel."""
    return (type(layer) is layers.Conv2D and layer.data_format == "channels_last"
            and layer.padding == "valid" and layer.groups == 1
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
            and tuple(input_shape[1:3]) == tuple(layer.kernel_size))


def convolve_as_matmul(layer, inputs):
    """`layer(inputs)` for a Conv2D that `covers_its_input`, as one MatMul: [N, kh, kw, C] ->
    [N, 1, 1, filters], the same arithmetic (kernel rows in the inputs' (h, w, c) order)."""
    kernel = keras.ops.cast(layer.kernel, layer.compute_dtype)
    rows = tf.reshape(inputs, [-1, inputs.shape[1] * inputs.shape[2] * inputs.shape[3]])
    outputs = matmul(rows, tf.reshape(kernel, [-1, layer.filters]))
    if layer.use_bias:
        outputs = tf.nn.bias_add(outputs, keras.ops.cast(layer.bias, layer.compute_dtype))
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return tf.reshape(outputs, [-1, 1, 1, layer.filters])


def matmul(rows, matrix):
    """rows [M, K] @ matrix [K, N]; by `BLOCK_COLUMNS`-wide column blocks of `matrix` for
    float32 on CPU with a static M under `MAX_BLOCKED_ROWS` and N a multiple of the block from
    `MIN_BLOCKED_COLUMNS` (see the module docstring), else one MatMul."""
    count, columns = rows.shape[0], matrix.shape[1]
    if (count is None or count >= MAX_BLOCKED_ROWS or columns is None
            or columns < MIN_BLOCKED_COLUMNS or columns % BLOCK_COLUMNS
            or rows.dtype != tf.float32 or accelerator_present()):
        return tf.matmul(rows, matrix)
    return _matmul_by_column_blocks(rows, matrix)


@tf.custom_gradient
def _matmul_by_column_blocks(rows, matrix):
    """rows @ matrix as a concatenation of products with `BLOCK_COLUMNS`-wide slices of
    `matrix`; the gradients are MatMul's own two products, whole."""
    blocks = tf.split(matrix, matrix.shape[1] // BLOCK_COLUMNS, axis=1)
    product = tf.concat([tf.matmul(rows, block) for block in blocks], axis=1)

    def gradient(product_gradient):
        return (tf.matmul(product_gradient, matrix, transpose_b=True),
                tf.matmul(rows, product_gradient, transpose_a=True))

    return product, gradient
