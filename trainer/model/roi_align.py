"""ROIAlign over the feature pyramid, by `tf.image.crop_and_resize` or by gathers.

Sampling is `tf.image.crop_and_resize`'s (what matterport's weights were trained with): a box
(y1, x1, y2, x2) in normalised coordinates is sampled on a regular grid of `crop_size` points
whose first and last points lie on the box edges, in feature coordinates scaled by (size - 1),
with bilinear interpolation and zeros for points outside the map.

Two samplers compute it. "crop_and_resize" (CPU and GPU) runs TensorFlow's kernel per pyramid
level; its gradient kernel adds into the feature map's gradient directly. "gather" uses
gathers only, for XLA (JIT_COMPILE, TPUs), which has no CropAndResize kernel; its gradient
holds four copies of the crops (one per bilinear corner) before summing them into the map's.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.model.image_meta import parse_image_meta


def _sample_positions(lo, hi, extent, count: int):
    """Grid positions along one axis: lo, hi [B, N] normalised; extent [B, N] map size.

    Returns float32 [B, N, count] positions in feature-map pixels.
    """
    scale = extent - 1.0
    if count == 1:
        return (0.5 * (lo + hi) * scale)[..., None]
    steps = tf.range(count, dtype=tf.float32) / float(count - 1)
    return lo[..., None] * scale[..., None] + steps * ((hi - lo) * scale)[..., None]


def multilevel_crop_and_resize(
    feature_maps: list[tf.Tensor],
    boxes: tf.Tensor,
    levels: tf.Tensor,
    crop_size: tuple[int, int],
    image_indices: tf.Tensor | None = None,
    sampler: str = "gather",
) -> tf.Tensor:
    """Bilinear crops of each box from the feature map of its level.

    feature_maps: L tensors float32 [B, H_l, W_l, C]
    boxes: float32 [B, N, (y1, x1, y2, x2)] normalised to each map (0..1)
    levels: int32 [B, N], index into `feature_maps` for each box
    image_indices: int32 [B, N], the image of the maps' batch each box crops from (default:
      box row b crops from image b)
    sampler: "gather" or "crop_and_resize" (the module docstring).
    Returns float32 [B, N, crop_h, crop_w, C].
    """
    batch = tf.shape(boxes)[0]
    num_boxes = tf.shape(boxes)[1]
    if image_indices is None:
        image_indices = tf.broadcast_to(tf.range(batch)[:, None], [batch, num_boxes])
    if sampler == "crop_and_resize":
        return _crop_and_resize_by_level(feature_maps, boxes, levels, crop_size, image_indices)
    if sampler != "gather":
        raise ValueError(f"unknown ROIAlign sampler {sampler!r}: gather or crop_and_resize")
    crop_h, crop_w = crop_size
    num_images = tf.shape(feature_maps[0])[0]
    channels = feature_maps[0].shape[-1]
    heights = tf.stack([tf.shape(f)[1] for f in feature_maps])
    widths = tf.stack([tf.shape(f)[2] for f in feature_maps])
    offsets = tf.cumsum(heights * widths, exclusive=True)
    # All levels side by side: one gather serves every box whatever its level.
    flat = tf.concat([tf.reshape(f, [num_images, -1, channels]) for f in feature_maps], axis=1)
    total = tf.shape(flat)[1]
    flat = tf.reshape(flat, [-1, channels])

    height = tf.cast(tf.gather(heights, levels), tf.float32)  # [B, N]
    width = tf.cast(tf.gather(widths, levels), tf.float32)
    ys = _sample_positions(boxes[..., 0], boxes[..., 2], height, crop_h)  # [B, N, crop_h]
    xs = _sample_positions(boxes[..., 1], boxes[..., 3], width, crop_w)  # [B, N, crop_w]
    inside_y = (ys >= 0.0) & (ys <= height[..., None] - 1.0)
    inside_x = (xs >= 0.0) & (xs <= width[..., None] - 1.0)

    def corners(pos, extent):
        low = tf.floor(pos)
        frac = pos - low
        max_index = extent[..., None] - 1.0
        low_i = tf.cast(tf.clip_by_value(low, 0.0, max_index), tf.int32)
        high_i = tf.cast(tf.clip_by_value(low + 1.0, 0.0, max_index), tf.int32)
        return low_i, high_i, frac

    y0, y1, wy = corners(ys, height)
    x0, x1, wx = corners(xs, width)
    base = image_indices * total + tf.gather(offsets, levels)  # [B, N]
    row_stride = tf.cast(width, tf.int32)

    def gather(yi, xi):
        index = (base[..., None, None]
                 + yi[..., :, None] * row_stride[..., None, None]
                 + xi[..., None, :])  # [B, N, crop_h, crop_w]
        return tf.gather(flat, index)  # [B, N, crop_h, crop_w, C]

    wy = wy[..., :, None, None]
    wx = wx[..., None, :, None]
    top = gather(y0, x0) * (1.0 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1.0 - wx) + gather(y1, x1) * wx
    crops = top * (1.0 - wy) + bottom * wy
    inside = tf.cast(inside_y[..., :, None] & inside_x[..., None, :], crops.dtype)
    return crops * inside[..., None]


def _crop_and_resize_by_level(feature_maps, boxes, levels, crop_size, image_indices):
    """`multilevel_crop_and_resize` by one `tf.image.crop_and_resize` per level over the boxes
    of that level, put back in box order. image_indices int32 [B, N]."""
    batch, num_boxes = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat_boxes = tf.reshape(boxes, [-1, 4])
    flat_levels = tf.reshape(levels, [-1])
    flat_images = tf.reshape(image_indices, [-1])
    crops, order = [], []
    for level, feature_map in enumerate(feature_maps):
        chosen = tf.reshape(tf.where(tf.equal(flat_levels, level)), [-1])
        crops.append(tf.image.crop_and_resize(
            feature_map, tf.gather(flat_boxes, chosen), tf.gather(flat_images, chosen),
            crop_size, method="bilinear", extrapolation_value=0.0))
        order.append(chosen)
    # The boxes sorted by level -> back in their own order.
    crops = tf.gather(tf.concat(crops, axis=0),
                      tf.math.invert_permutation(tf.cast(tf.concat(order, axis=0), tf.int32)))
    return tf.reshape(crops, tf.concat([[batch, num_boxes], tf.shape(crops)[1:]], axis=0))


def pyramid_levels(boxes: tf.Tensor, image_shape: tf.Tensor, min_level: int = 2,
                   max_level: int = 5) -> tf.Tensor:
    """FPN paper's equation 1: the pyramid level of each box, as an index from 0 (= P2).

    boxes: float32 [B, N, 4] normalised; image_shape: (height, width) in pixels. A 224x224
    box in pixels maps to P4; zero-area (padding) boxes go to the finest level.
    """
    area = tf.maximum((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), 1e-12)
    image_area = tf.cast(image_shape[0] * image_shape[1], tf.float32)
    level = tf.math.log(tf.sqrt(area) / (224.0 / tf.sqrt(image_area))) / tf.math.log(2.0)
    level = tf.clip_by_value(4 + tf.cast(tf.round(level), tf.int32), min_level, max_level)
    return level - min_level


@keras.saving.register_keras_serializable(package="mrcnn")
class PyramidROIAlign(keras.layers.Layer):
    """Pools each ROI from the P2..P5 level its size selects.

    Inputs: [boxes float32 [B, N, (y1, x1, y2, x2)] normalised, image_meta [B, META],
    P2, P3, P4, P5]; with `image_indices`, [boxes, image_indices int32 [B', N], image_meta,
    P2..P5], each box cropping from the maps' image its index names (boxes of several images
    in one row). Output: float32 [B, N, pool_h, pool_w, C]. No weights.
    """

    def __init__(self, pool_shape: tuple[int, int], image_indices: bool = False,
                 sampler: str = "gather", **kwargs):
        super().__init__(**kwargs)
        self.pool_shape = tuple(pool_shape)
        self.image_indices = bool(image_indices)
        self.sampler = sampler

    def call(self, inputs):
        if self.image_indices:
            boxes, image_indices, image_meta, *feature_maps = inputs
        else:
            (boxes, image_meta, *feature_maps), image_indices = inputs, None
        boxes = tf.stop_gradient(boxes)  # proposals are not trained through the crop
        # All images of a batch share one padded shape: the first image's meta gives it.
        image_shape = parse_image_meta(image_meta)["image_shape"][0]
        levels = tf.stop_gradient(pyramid_levels(boxes, image_shape))
        return multilevel_crop_and_resize(feature_maps, boxes, levels, self.pool_shape,
                                          image_indices=image_indices, sampler=self.sampler)

    def compute_output_shape(self, input_shape):
        return (*input_shape[0][:2], *self.pool_shape, input_shape[-1][-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_shape": list(self.pool_shape),
                "image_indices": self.image_indices, "sampler": self.sampler}
