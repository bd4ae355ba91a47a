"""Anchors: one scale per pyramid level, several aspect ratios, one set per feature-map cell.

Order (the RPN's outputs rely on it): level by level (P2..P6); within a level, cells row by
row; within a cell, one anchor per ratio. Boxes are (y1, x1, y2, x2) in pixels centred on
`cell * feature_stride` (matterport's convention: the first centre is at 0, not stride/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.model.box_ops import norm_boxes


def feature_shapes(image_shape: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level's feature map for an image of `image_shape`."""
    return [
        (int(math.ceil(image_shape[0] / s)), int(math.ceil(image_shape[1] / s))) for s in strides
    ]


def level_anchors(
    scale: float,
    ratios: Sequence[float],
    shape: tuple[int, int],
    feature_stride: int,
    anchor_stride: int = 1,
) -> tf.Tensor:
    """Anchors of one level: float32 [rows * cols * len(ratios), (y1, x1, y2, x2)] pixels.

    A ratio is width / height: 0.5 gives a tall anchor, 2 a wide one; all keep area scale**2.
    """
    ratios = tf.constant(ratios, tf.float32)
    heights = scale / tf.sqrt(ratios)
    widths = scale * tf.sqrt(ratios)
    ys = tf.cast(tf.range(0, shape[0], anchor_stride) * feature_stride, tf.float32)
    xs = tf.cast(tf.range(0, shape[1], anchor_stride) * feature_stride, tf.float32)
    center_y, center_x = tf.meshgrid(ys, xs, indexing="ij")  # [rows, cols]
    center_y = center_y[..., None]  # [rows, cols, 1], broadcast against [ratios]
    center_x = center_x[..., None]
    boxes = tf.stack(
        [
            center_y - 0.5 * heights,
            center_x - 0.5 * widths,
            center_y + 0.5 * heights,
            center_x + 0.5 * widths,
        ],
        axis=-1,
    )
    return tf.reshape(boxes, [-1, 4])


def pyramid_anchors(
    scales: Sequence[float],
    ratios: Sequence[float],
    shapes: Sequence[tuple[int, int]],
    feature_strides: Sequence[int],
    anchor_stride: int = 1,
) -> tf.Tensor:
    """All levels' anchors concatenated: float32 [num_anchors, (y1, x1, y2, x2)] pixels."""
    return tf.concat(
        [
            level_anchors(scale, ratios, shape, stride, anchor_stride)
            for scale, shape, stride in zip(scales, shapes, feature_strides, strict=True)
        ],
        axis=0,
    )


def anchors_for_image(config, image_shape: Sequence[int], normalized: bool = False) -> np.ndarray:
    """The anchors of `config` for a (resized) image of `image_shape`: float32 [A, 4].

    Pixel coordinates, or normalised ones (matterport's `norm_boxes`) when `normalized`.
    """
    shapes = feature_shapes(image_shape, config.BACKBONE_STRIDES)
    anchors = pyramid_anchors(
        config.RPN_ANCHOR_SCALES,
        config.RPN_ANCHOR_RATIOS,
        shapes,
        config.BACKBONE_STRIDES,
        config.RPN_ANCHOR_STRIDE,
    )
    if normalized:
        anchors = norm_boxes(anchors, image_shape[:2])
    return anchors.numpy()


@keras.saving.register_keras_serializable(package="mrcnn")
class AnchorsLayer(keras.layers.Layer):
    """The anchors of the images fed to the model: input image [B, H, W, C] -> float32 [A, 4]
    normalised. Computed from the image shape in the graph (constant-folded when it is static),
    so inputs of any padded size get matching anchors."""

    def __init__(self, scales, ratios, strides, anchor_stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        self.strides = tuple(int(s) for s in strides)
        self.anchor_stride = int(anchor_stride)

    def call(self, image):
        shape = tf.shape(image)[1:3]
        shapes = [(-(-shape[0] // s), -(-shape[1] // s)) for s in self.strides]  # ceil
        anchors = pyramid_anchors(self.scales, self.ratios, shapes, self.strides,
                                  self.anchor_stride)
        return norm_boxes(anchors, shape)

    def compute_output_shape(self, input_shape):
        return (None, 4)

    def get_config(self) -> dict:
        return {**super().get_config(), "scales": list(self.scales), "ratios": list(self.ratios),
                "strides": list(self.strides), "anchor_stride": self.anchor_stride}
