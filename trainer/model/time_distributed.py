"""TimeDistributed that folds the ROI axis into the batch.

Keras 3's TimeDistributed maps the wrapped layer over the time axis (`vectorized_map`), which
on CPU runs the classifier's 7x7 "fully connected" convolution ~35x slower than one call on
[batch * rois, ...]. Same weights, same names, same results: only the execution differs.

A convolution whose kernel covers its whole input (matterport's `mrcnn_class_conv1`, 7x7 on
7x7 pooled ROIs, and `mrcnn_class_conv2`, 1x1 on 1x1) is a matrix product: it runs as one
MatMul on the flattened ROIs with the kernel reshaped to [kh * kw * in, out]. oneDNN's
convolution would reorder that 50 MB kernel into its blocked layout twice a training step
(forward and input gradient), about 5 % of the 256 px step; MatMul reads it as it is.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers


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
    outputs = tf.matmul(rows, tf.reshape(kernel, [-1, layer.filters]))
    if layer.use_bias:
        outputs = tf.nn.bias_add(outputs, keras.ops.cast(layer.bias, layer.compute_dtype))
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return tf.reshape(outputs, [-1, 1, 1, layer.filters])
