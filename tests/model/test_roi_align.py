import math

import numpy as np
import tensorflow as tf

from trainer.model.image_meta import compose_image_meta
from trainer.model.roi_align import PyramidROIAlign, multilevel_crop_and_resize, pyramid_levels


def numpy_crop(feature: np.ndarray, box, size: tuple[int, int]) -> np.ndarray:
    """Reference bilinear crop with crop_and_resize's sampling: `size` points from edge to edge
    of the box, in feature coordinates scaled by (extent - 1), zero outside the map."""
    height, width, channels = feature.shape
    y1, x1, y2, x2 = box
    out = np.zeros((*size, channels), np.float64)
    for i in range(size[0]):
        y = (y1 * (height - 1) + i * (y2 - y1) * (height - 1) / (size[0] - 1)
             if size[0] > 1 else 0.5 * (y1 + y2) * (height - 1))
        for j in range(size[1]):
            x = (x1 * (width - 1) + j * (x2 - x1) * (width - 1) / (size[1] - 1)
                 if size[1] > 1 else 0.5 * (x1 + x2) * (width - 1))
            if not (0 <= y <= height - 1 and 0 <= x <= width - 1):
                continue
            top, left = math.floor(y), math.floor(x)
            bottom, right = min(top + 1, height - 1), min(left + 1, width - 1)
            dy, dx = y - top, x - left
            out[i, j] = (feature[top, left] * (1 - dy) * (1 - dx)
                         + feature[top, right] * (1 - dy) * dx
                         + feature[bottom, left] * dy * (1 - dx)
                         + feature[bottom, right] * dy * dx)
    return out


def test_pyramid_roi_align_matches_numpy_reference():
    rng = np.random.default_rng(1)
    image_side = 256
    maps = [rng.normal(size=(2, image_side // s, image_side // s, 5)).astype(np.float32)
            for s in (4, 8, 16, 32)]
    # Boxes of several sizes (so several levels), one reaching outside the image, one padding.
    boxes = np.array([
        [[0.1, 0.1, 0.2, 0.25],     # ~ 26 x 38 px: P2
         [0.2, 0.3, 0.6, 0.7],      # ~ 102 px: P3
         [0.05, 0.0, 0.95, 0.9],    # ~ 230 px: P4
         [-0.1, 0.5, 0.3, 1.2]],    # partly outside: zeros there
        [[0.0, 0.0, 1.0, 1.0],      # 256 px: P4
         [0.5, 0.5, 0.55, 0.52],    # tiny: P2
         [0.3, 0.3, 0.7, 0.7],
         [0.0, 0.0, 0.0, 0.0]],     # padding: finest level, a constant sample
    ], np.float32)
    meta = np.stack([compose_image_meta(0, [image_side, image_side, 3],
                                        [image_side, image_side, 3], [0, 0, 256, 256], 1.0,
                                        np.ones(4)).numpy()] * 2)
    for sampler in ("gather", "crop_and_resize"):
        layer = PyramidROIAlign((7, 7), sampler=sampler)
        pooled = layer([tf.constant(boxes), tf.constant(meta), *map(tf.constant, maps)]).numpy()
        assert pooled.shape == (2, 4, 7, 7, 5)

        for b in range(2):
            for n in range(4):
                y1, x1, y2, x2 = boxes[b, n]
                # FPN equation 1, written out independently: k = 4 + log2(sqrt(wh) / 224).
                side = math.sqrt(max((y2 - y1) * (x2 - x1), 1e-12)) * image_side
                level = min(5, max(2, 4 + int(np.round(math.log2(side / 224.0)))))
                expected = numpy_crop(maps[level - 2][b], boxes[b, n], (7, 7))
                np.testing.assert_allclose(pooled[b, n], expected, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{sampler}: box {b},{n} at P{level}")


def test_both_samplers_give_the_same_crops_and_feature_gradients():
    rng = np.random.default_rng(3)
    maps = [tf.constant(rng.normal(size=(2, s, s, 4)), tf.float32) for s in (32, 16, 8, 4)]
    corner = rng.uniform(-0.1, 0.9, size=(3, 6, 2))
    boxes = tf.constant(np.concatenate([corner, corner + rng.uniform(0, 0.5, (3, 6, 2))], -1),
                        tf.float32)
    levels = tf.constant(rng.integers(0, 4, (3, 6)), tf.int32)
    images = tf.constant(rng.integers(0, 2, (3, 6)), tf.int32)  # rows mixing both images
    results = []
    for sampler in ("gather", "crop_and_resize"):
        with tf.GradientTape() as tape:
            tape.watch(maps)
            crops = multilevel_crop_and_resize(maps, boxes, levels, (7, 7), images, sampler)
            loss = tf.reduce_sum(crops * tf.sin(crops))  # a gradient that differs per sample
        results.append([crops, *tape.gradient(loss, maps)])
    assert results[0][0].shape == (3, 6, 7, 7, 4)
    for got, want in zip(*results):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_levels_follow_box_size():
    boxes = tf.constant([[[0, 0, 224 / 1024, 224 / 1024], [0, 0, 112 / 1024, 112 / 1024],
                          [0, 0, 1, 1], [0, 0, 0, 0]]], tf.float32)
    levels = pyramid_levels(boxes, tf.constant([1024.0, 1024.0])).numpy()
    # 224 px -> P4 (index 2); half that -> P3; the whole 1024 image -> P6 capped at P5; padding P2
    np.testing.assert_array_equal(levels, [[2, 1, 3, 0]])


def test_roi_align_matches_tf_crop_and_resize_single_level():
    rng = np.random.default_rng(2)
    feature = rng.normal(size=(1, 16, 12, 3)).astype(np.float32)
    boxes = np.array([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32)
    ours = multilevel_crop_and_resize([tf.constant(feature)], tf.constant(boxes[None]),
                                      tf.zeros([1, 2], tf.int32), (5, 4)).numpy()[0]
    theirs = tf.image.crop_and_resize(feature, boxes, [0, 0], (5, 4)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
