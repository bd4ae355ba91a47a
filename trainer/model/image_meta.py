"""Image meta: the per-image facts the graph needs, packed in one float vector as matterport does.

Layout (length 12 + NUM_CLASSES): image_id, original_image_shape (3), image_shape (3) after
resizing and padding, window (4) (y1, x1, y2, x2) in pixels of the real image inside the
padding, scale (1), active_class_ids (NUM_CLASSES).
"""

from __future__ import annotations

import tensorflow as tf


def compose_image_meta(image_id, original_image_shape, image_shape, window, scale,
                       active_class_ids) -> tf.Tensor:
    """Packs the fields (scalars or 1-D tensors) into float32 [12 + NUM_CLASSES]."""
    parts = [
        tf.reshape(tf.cast(image_id, tf.float32), [1]),
        tf.cast(original_image_shape, tf.float32),
        tf.cast(image_shape, tf.float32),
        tf.cast(window, tf.float32),
        tf.reshape(tf.cast(scale, tf.float32), [1]),
        tf.cast(active_class_ids, tf.float32),
    ]
    return tf.concat(parts, axis=0)


def parse_image_meta(meta: tf.Tensor) -> dict[str, tf.Tensor]:
    """Unpacks meta [..., 12 + NUM_CLASSES] into its fields (float32, leading axes kept)."""
    return {
        "image_id": tf.cast(meta[..., 0], tf.int32),
        "original_image_shape": meta[..., 1:4],
        "image_shape": meta[..., 4:7],
        "window": meta[..., 7:11],
        "scale": meta[..., 11],
        "active_class_ids": meta[..., 12:],
    }
