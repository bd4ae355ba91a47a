"""Conv2D with cheaper gradients where its output gradient or its shape allows, and a faster
forward for one image.

Three paths, each exact (the same sums, summed in another order) and chosen per layer:

1. **Sparse output gradient** (`sparse_output_gradient=True`, the RPN's shared conv). The RPN's
   losses read only the anchors sampled for them (`RPN_TRAIN_ANCHORS_PER_IMAGE`, 256 per image),
   so the gradient reaching `rpn_conv_shared`'s output is zero at every pixel but the few under
   a sampled anchor: at most 256 of the 5,456 pixels of a 256 px image's five levels. Both of the
   convolution's gradients are sums over output pixels, and a zero pixel adds nothing: with the
   P live pixels gathered, the weight gradient is patches[P, k*k*in]^T @ gradient[P, out] and
   the input gradient is gradient[P, out] @ kernel^T scattered back onto each pixel's k x k
   neighbourhood (`sparse_convolution_gradients`). When more than `MAX_LIVE_FRACTION` of the
   rows are live the dense gradients run instead (a `tf.cond` on the count), so a loss that
   reads every anchor stays as fast as before. The live pixels have a data-dependent count:
   XLA (JIT_COMPILE) cannot compile that, so the model turns it off there.
2. **Patch weight gradient**. On AVX2 CPUs oneDNN has one weight-gradient kernel for
   channels-last float32 convolutions (`jit:avx2` backward_weights), and on wide, large maps it
   runs at half its forward's speed. The same gradient is a single matrix product: with the
   input's k x k patches flattened to [pixels, k * k * in] (`ExtractImagePatches`, zero padding
   as "same" pads) and the output gradient as [pixels, out], dLoss/dkernel = patches^T @
   output_gradient, reshaped to the kernel.

Measured on a 2-core AMD EPYC (AVX2, oneDNN on), batch 2, 3x3, stride 1 (bench numbers in
README's speed section). Both gradients of the RPN's conv at P2 (256 -> 512, 64x64) with 256
live pixels per image: dense (oneDNN input gradient + patch weight gradient) 272-297 ms, sparse
19-21 ms; at P3 (32x32) 74 vs 20 ms. oneDNN's weight gradient against the patch product, ms:

    in -> out     map      oneDNN   patches
    256 -> 512    64x64    284      142      the RPN's shared conv at P2
    256 -> 512    32x32     45       36
    256 -> 256    64x64    123      104      fpn_p2
    256 -> 256    32x32     31       28
    256 -> 256    16x16    8.5      7.9
    128 -> 128    32x32    8.2      8.2
     64 ->  64    64x64    11.7     13.6     ResNet stage 2: slower, so not used there

3. **Tiled forward for one image** (`tiles_apply`, `convolve_by_tiles`). With a batch of one
   image, oneDNN's forward convolution on this AVX2 machine runs at half speed: 256 -> 256 at
   64x64 (fpn_p2 in `detect()`) 78-88 ms, 59 GFLOP/s, where the mask head's 100 ROIs run the
   same kernel at 160-180. Cut into its four quadrants, each with the one-pixel border its 3x3
   windows read, and stacked as a batch of four, the same convolution ("valid" on each tile)
   takes 33-37 ms; 256 -> 256 at 32x32 23 -> 12 ms, 256 -> 512 at 64x64 79-86 -> 68-73 ms; with
   two images it is no faster (66-68 vs 70-72 ms), so it is for batch 1 only. The same sums
   over the same windows: outputs equal to float rounding.

Where the patch product applies (`patch_gradient_applies`): float32, channels last, an odd
square kernel larger than 1x1, stride 1, no dilation, one group, "same" padding, at least
`MIN_INPUT_CHANNELS` input channels and `MIN_PIXELS` pixels per map, and no GPU or TPU present
(cuDNN's gradients are better there); the tiled forward, where the patch product applies to a
batch of one image of even height and width. The sparse path needs the same shape of
convolution (any float dtype, any size, 1x1 included) and is asked for by the layer. Elsewhere
it is Keras's Conv2D. Except on tiles the forward pass is TensorFlow's own convolution (oneDNN
still fuses the bias and ReLU into it); the weights, their names and the h5 layout are Conv2D's.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer.model.devices import accelerator_present

MIN_INPUT_CHANNELS = 256
MIN_PIXELS = 32 * 32
# Above this share of live output pixels the dense gradients are cheaper (the sparse ones
# gather k * k input rows and scatter k * k gradient rows per live pixel).
MAX_LIVE_FRACTION = 0.25


@keras.saving.register_keras_serializable(package="mrcnn")
class Conv2D(layers.Conv2D):
    """keras Conv2D, with the weight gradient as one patch product where that is faster, and
    with `sparse_output_gradient=True` both gradients over the pixels whose output gradient is
    not zero (see the module docstring)."""

    def __init__(self, *args, sparse_output_gradient: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sparse_output_gradient = bool(sparse_output_gradient)

    def convolution_op(self, inputs, kernel):
        patches = patch_gradient_applies(self, inputs.shape)
        sparse = self.sparse_output_gradient and _stride_one_same(self)
        if not (patches or sparse):
            return super().convolution_op(inputs, kernel)
        return convolve_with_gradients(inputs, tf.convert_to_tensor(kernel),
                                       patch_gradient=patches, sparse_gradient=sparse,
                                       tiled_forward=tiles_apply(self, inputs.shape))

    def get_config(self):
        return {**super().get_config(), "sparse_output_gradient": self.sparse_output_gradient}


def _stride_one_same(layer: layers.Conv2D) -> bool:
    """A stride-1, "same", undilated, ungrouped, channels-last convolution with an odd square
    kernel: the convolutions both gradient paths are written for."""
    size = tuple(layer.kernel_size)
    return (layer.data_format == "channels_last" and size[0] == size[1] and size[0] % 2 == 1
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1 and (layer.padding == "same" or size[0] == 1))


def patch_gradient_applies(layer: layers.Conv2D, input_shape) -> bool:
    """Whether `layer` on inputs of `input_shape` [N, H, W, C] gets the patch weight gradient
    (unknown H or W: yes, as for a large map)."""
    _, height, width, channels = tuple(input_shape)
    large = height is None or width is None or height * width >= MIN_PIXELS
    return (layer.compute_dtype == "float32" and _stride_one_same(layer)
            and layer.kernel_size[0] > 1 and layer.padding == "same"
            and channels is not None and channels >= MIN_INPUT_CHANNELS and large
            and not accelerator_present())


def tiles_apply(layer: layers.Conv2D, input_shape) -> bool:
    """Whether `layer` on inputs of `input_shape` runs its forward by `convolve_by_tiles`: where
    the patch weight gradient applies, on one image of known, even height and width."""
    batch, height, width, _ = tuple(input_shape)
    return (batch == 1 and height is not None and width is not None
            and height % 2 == 0 and width % 2 == 0 and patch_gradient_applies(layer, input_shape))


def convolve_by_tiles(inputs, kernel):
    """A stride-1 "same" convolution of one image [1, H, W, C] (H, W even) with kernel
    [k, k, C, F], k odd, as four "valid" convolutions of its quadrants batched together (each
    quadrant with the border of k // 2 pixels its windows read, zeros outside the image)."""
    _, height, width, _ = inputs.shape
    half, filters = kernel.shape[0] // 2, kernel.shape[-1]
    rows, columns = height // 2, width // 2
    padded = tf.pad(inputs, [[0, 0], [half, half], [half, half], [0, 0]])
    tiles = tf.concat([padded[:, r * rows:(r + 1) * rows + 2 * half,
                              c * columns:(c + 1) * columns + 2 * half]
                       for r in (0, 1) for c in (0, 1)], axis=0)
    outputs = tf.nn.conv2d(tiles, kernel, strides=1, padding="VALID")  # [4, rows, columns, F]
    # (tile row, tile column, row, column) -> (tile row, row, tile column, column)
    outputs = tf.transpose(tf.reshape(outputs, [2, 2, rows, columns, filters]), [0, 2, 1, 3, 4])
    return tf.reshape(outputs, [1, height, width, filters])


def convolve_with_gradients(inputs, kernel, *, patch_gradient: bool, sparse_gradient: bool,
                            tiled_forward: bool):
    """A stride-1 "same" convolution of inputs [N, H, W, C] with kernel [k, k, C, F], k odd:
    TensorFlow's forward (by `convolve_by_tiles` with `tiled_forward`); for the gradients,
    `sparse_convolution_gradients` when asked for and the output gradient is mostly zero, else
    TensorFlow's input gradient and, with `patch_gradient`, `patch_weight_gradient` for the
    kernel (TensorFlow's otherwise)."""

    @tf.custom_gradient
    def convolve(inputs, kernel):
        if tiled_forward:
            outputs = convolve_by_tiles(inputs, kernel)
        else:
            outputs = tf.nn.conv2d(inputs, kernel, strides=1, padding="SAME")

        def dense(output_gradient):
            input_gradient = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(inputs), filter=kernel, out_backprop=output_gradient,
                strides=[1, 1, 1, 1], padding="SAME")
            if patch_gradient:
                kernel_gradient = patch_weight_gradient(inputs, output_gradient, kernel.shape)
            else:
                kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
                    input=inputs, filter_sizes=tf.shape(kernel), out_backprop=output_gradient,
                    strides=[1, 1, 1, 1], padding="SAME")
            return input_gradient, kernel_gradient

        def gradient(output_gradient):
            if not sparse_gradient:
                return dense(output_gradient)
            rows = tf.reshape(output_gradient, [-1, kernel.shape[-1]])
            live = tf.cast(tf.where(tf.reduce_any(rows != 0, axis=-1))[:, 0], tf.int32)
            few = tf.cast(tf.size(live), tf.float32) <= (
                MAX_LIVE_FRACTION * tf.cast(tf.shape(rows)[0], tf.float32))
            return tf.cond(few,
                           lambda: sparse_convolution_gradients(inputs, kernel, rows, live),
                           lambda: dense(output_gradient))

        return outputs, gradient

    return convolve(inputs, kernel)


def sparse_convolution_gradients(inputs, kernel, output_gradient_rows, live):
    """Both gradients of a stride-1 "same" convolution (kernel [k, k, C, F], k odd) summed over
    the live output pixels only: inputs [N, H, W, C]; output_gradient_rows [N * H * W, F], the
    output gradient with one row per pixel (row-major: image, row, column), zero outside `live`;
    live int32 [P], those rows' indices. Returns (input gradient [N, H, W, C], kernel gradient
    [k, k, C, F])."""
    size, _, channels, filters = kernel.shape
    shape = tf.shape(inputs)
    height, width = shape[1], shape[2]
    pixels = shape[0] * height * width
    gradient = tf.gather(output_gradient_rows, live)  # [P, F]
    # The input pixel under each kernel tap of each live output pixel, in the kernel's (row,
    # column) order; taps in the "same" padding point at `pixels`, an extra zero row.
    tap_rows, tap_columns = np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2,
                                        indexing="ij")
    image, pixel = live // (height * width), live % (height * width)
    row = pixel[:, None] // width + tap_rows.reshape(1, -1)  # [P, k * k]
    column = pixel[:, None] % width + tap_columns.reshape(1, -1)
    inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
    source = tf.where(inside, (image[:, None] * height + row) * width + column, pixels)

    input_rows = tf.concat([tf.reshape(inputs, [-1, channels]),
                            tf.zeros([1, channels], inputs.dtype)], axis=0)
    patches = tf.reshape(tf.gather(input_rows, source), [-1, size * size * channels])
    kernel_gradient = tf.reshape(tf.matmul(patches, gradient, transpose_a=True), kernel.shape)

    per_tap = tf.matmul(gradient, tf.reshape(kernel, [-1, filters]), transpose_b=True)
    input_gradient = tf.math.unsorted_segment_sum(
        tf.reshape(per_tap, [-1, channels]), tf.reshape(source, [-1]), pixels + 1)
    return tf.reshape(input_gradient[:-1], shape), kernel_gradient


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
