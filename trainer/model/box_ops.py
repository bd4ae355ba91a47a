"""Box arithmetic in TensorFlow. One box format everywhere: [..., (y1, x1, y2, x2)].

Deltas are matterport's: [..., (dy, dx, log(dh), log(dw))] with centres and sizes measured
as y2 - y1 (no +1), so pixel and normalised boxes share one formula.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def box_deltas(boxes: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Encodes the refinement that moves `boxes` onto `targets`.

    boxes, targets: float32 [..., 4] (y1, x1, y2, x2) -> float32 [..., (dy, dx, log(dh), log(dw))].
    Both must have positive height and width.
    """
    boxes = tf.cast(boxes, tf.float32)
    targets = tf.cast(targets, tf.float32)
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    center_y = boxes[..., 0] + 0.5 * height
    center_x = boxes[..., 1] + 0.5 * width
    t_height = targets[..., 2] - targets[..., 0]
    t_width = targets[..., 3] - targets[..., 1]
    t_center_y = targets[..., 0] + 0.5 * t_height
    t_center_x = targets[..., 1] + 0.5 * t_width
    return tf.stack(
        [
            (t_center_y - center_y) / height,
            (t_center_x - center_x) / width,
            tf.math.log(t_height / height),
            tf.math.log(t_width / width),
        ],
        axis=-1,
    )


# Largest log-scale change a delta may apply (as torchvision and Detectron): an untrained or
# diverging head can predict exp() overflows, and inf - inf boxes poison everything after.
MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def apply_box_deltas(boxes: tf.Tensor, deltas: tf.Tensor) -> tf.Tensor:
    """Decodes: applies deltas [..., (dy, dx, log(dh), log(dw))] to boxes [..., (y1, x1, y2, x2)].

    log(dh) and log(dw) are capped at MAX_LOG_SCALE so the result stays finite.
    """
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    center_y = boxes[..., 0] + 0.5 * height + deltas[..., 0] * height
    center_x = boxes[..., 1] + 0.5 * width + deltas[..., 1] * width
    height = height * tf.exp(tf.minimum(deltas[..., 2], MAX_LOG_SCALE))
    width = width * tf.exp(tf.minimum(deltas[..., 3], MAX_LOG_SCALE))
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return tf.stack([y1, x1, y1 + height, x1 + width], axis=-1)


def clip_boxes(boxes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Clips boxes [..., 4] into window [..., 4] (y1, x1, y2, x2), broadcast over leading axes."""
    window = tf.cast(window, boxes.dtype)
    lo = tf.stack([window[..., 0], window[..., 1], window[..., 0], window[..., 1]], axis=-1)
    hi = tf.stack([window[..., 2], window[..., 3], window[..., 2], window[..., 3]], axis=-1)
    return tf.minimum(tf.maximum(boxes, lo), hi)


def box_area(boxes: tf.Tensor) -> tf.Tensor:
    """boxes [..., 4] -> [...] area, zero for degenerate boxes."""
    return tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(
        boxes[..., 3] - boxes[..., 1], 0.0
    )


def box_iou(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
    """Pairwise IoU. boxes1 [..., N, 4], boxes2 [..., M, 4] -> [..., N, M].

    A pair whose union is empty (two degenerate boxes) has IoU 0, not NaN.
    """
    b1 = boxes1[..., :, None, :]
    b2 = boxes2[..., None, :, :]
    inter_h = tf.minimum(b1[..., 2], b2[..., 2]) - tf.maximum(b1[..., 0], b2[..., 0])
    inter_w = tf.minimum(b1[..., 3], b2[..., 3]) - tf.maximum(b1[..., 1], b2[..., 1])
    inter_h, inter_w = tf.maximum(inter_h, 0.0), tf.maximum(inter_w, 0.0)
    intersection = inter_h * inter_w
    union = box_area(b1) + box_area(b2) - intersection
    return tf.math.divide_no_nan(intersection, union)


def norm_boxes(boxes: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Pixel boxes -> normalised ones, matterport's convention.

    boxes: [..., (y1, x1, y2, x2)] in pixels, y2/x2 exclusive; shape: (height, width).
    (y2, x2) is moved inside the box (-1) so that a full-image box maps to (0, 0, 1, 1).
    """
    shape = tf.cast(shape, tf.float32)
    h, w = shape[0], shape[1]
    scale = tf.stack([h - 1.0, w - 1.0, h - 1.0, w - 1.0])
    shift = tf.constant([0.0, 0.0, 1.0, 1.0])
    return (tf.cast(boxes, tf.float32) - shift) / scale


def denorm_boxes(boxes: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Inverse of `norm_boxes`, rounded to whole pixels: float32 [..., 4] pixel boxes."""
    shape = tf.cast(shape, tf.float32)
    h, w = shape[0], shape[1]
    scale = tf.stack([h - 1.0, w - 1.0, h - 1.0, w - 1.0])
    shift = tf.constant([0.0, 0.0, 1.0, 1.0])
    return tf.round(boxes * scale + shift)


@keras.saving.register_keras_serializable(package="mrcnn")
class NormBoxes(keras.layers.Layer):
    """[pixel boxes [B, G, 4], image [B, H, W, C]] -> boxes normalised to the image's size."""

    def call(self, inputs):
        boxes, image = inputs
        return norm_boxes(boxes, tf.shape(image)[1:3])

    def compute_output_shape(self, input_shape):
        return input_shape[0]
