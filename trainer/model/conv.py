"""Conv2D whose weight gradient is one matrix product over image patches where that is faster.

On AVX2 CPUs oneDNN has one weight-gradient kernel for channels-last float32 convolutions
(`jit:avx2` backward_weights), and on wide, large maps it runs at half its forward's speed. The
same gradient is a single matrix product: with the input's k x k patches flattened to
[pixels, k * k * in] (`ExtractImagePatches`, zero padding as "same" pads) and the output
gradient as [pixels, out], dLoss/dkernel = patches^T @ output_gradient, reshaped to the kernel.

Measured on a 2-core AMD EPYC (AVX2, oneDNN on), batch 2, 3x3, stride 1: oneDNN's weight
gradient against the patch product, ms (bench numbers in README's speed section):

    in -> out     map      oneDNN   patches
    256 -> 512    64x64    284      142      the RPN's shared conv at P2
    256 -> 512    32x32     45       36
    256 -> 256    64x64    123      104      fpn_p2
    256 -> 256    32x32     31       28
    256 -> 256    16x16    8.5      7.9
    128 -> 128    32x32    8.2      8.2
     64 ->  64    64x64    11.7     13.6     ResNet stage 2: slower, so not used there

Where it applies (`patch_gradient_applies`): float32, channels last, an odd square kernel larger
than 1x1, stride 1, no dilation, one group, "same" padding, at least `MIN_INPUT_CHANNELS` input
channels and `MIN_PIXELS` pixels per map, and no GPU or TPU present (cuDNN's gradients are
better there). Elsewhere it is Keras's Conv2D. Either way the forward pass and the input
gradient are TensorFlow's own convolutions (oneDNN still fuses the bias and ReLU into the
forward one), and the weights, their names and the h5 layout are Conv2D's.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from keras import layers

MIN_INPUT_CHANNELS = 256
MIN_PIXELS = 32 * 32


@functools.cache
def _accelerator_present() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


@keras.saving.register_keras_serializable(package="mrcnn")
class Conv2D(layers.Conv2D):
    """keras Conv2D, with the weight gradient as one patch product where that is faster (see
    the module docstring)."""

    def convolution_op(self, inputs, kernel):
        if not patch_gradient_applies(self, inputs.shape):
            return super().convolution_op(inputs, kernel)
        return convolve_with_patch_gradient(inputs, tf.convert_to_tensor(kernel))


def patch_gradient_applies(layer: layers.Conv2D, input_shape) -> bool:
    """Whether `layer` on inputs of `input_shape` [N, H, W, C] gets
    `convolve_with_patch_gradient` (unknown H or W: yes, as for a large map)."""
    size = tuple(layer.kernel_size)
    _, height, width, channels = tuple(input_shape)
    large = height is None or width is None or height * width >= MIN_PIXELS
    return (layer.compute_dtype == "float32" and layer.data_format == "channels_last"
            and size[0] == size[1] and size[0] % 2 == 1 and size[0] > 1
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1 and layer.padding == "same"
            and channels is not None and channels >= MIN_INPUT_CHANNELS and large
            and not _accelerator_present())


@tf.custom_gradient
def convolve_with_patch_gradient(inputs, kernel):
    """A stride-1 "same" convolution of inputs [N, H, W, C] with kernel [k, k, C, F], k odd:
    TensorFlow's forward and input gradient, `patch_weight_gradient` for the kernel."""
    outputs = tf.nn.conv2d(inputs, kernel, strides=1, padding="SAME")

    def gradient(output_gradient):
        input_gradient = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(inputs), filter=kernel, out_backprop=output_gradient,
            strides=[1, 1, 1, 1], padding="SAME")
        return input_gradient, patch_weight_gradient(inputs, output_gradient, kernel.shape)

    return outputs, gradient


def patch_weight_gradient(inputs, output_gradient, kernel_shape):
    """dLoss/dkernel [k, k, C, F] of a stride-1 "same" convolution (k odd) from its inputs
    [N, H, W, C] and output gradient [N, H, W, F]: the input's k x k patches, flattened in the
    kernel's (row, column, channel) order, times the output gradient, summed over pixels."""
    size, _, channels, filters = kernel_shape
    # Only once the output gradient exists: the patches depend on the forward input alone, and
    # the executor would otherwise make them during the forward pass and hold them (75 MB at
    # the 256 px P2) until the backward pass gets there.
    with tf.control_dependencies([output_gradient]):
        inputs = tf.identity(inputs)
    patches = tf.image.extract_patches(inputs, sizes=[1, size, size, 1], strides=[1, 1, 1, 1],
                                       rates=[1, 1, 1, 1], padding="SAME")
    product = tf.matmul(tf.reshape(patches, [-1, size * size * channels]),
                        tf.reshape(output_gradient, [-1, filters]), transpose_a=True)
    return tf.reshape(product, kernel_shape)
