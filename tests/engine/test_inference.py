"""trainer.engine.inference: grouping images by molded shape (what detect and evaluate batch)
and unmolding masks, numpy's bilinear resize against tf.image.resize."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.config import Config
from trainer.engine.inference import (
    batches_by_shape,
    molded_shape,
    unmold_detections,
    unmold_mask,
)


def test_batches_share_a_shape_keep_input_order_and_fill_before_the_rest():
    items = [("a", 1), ("b", 2), ("c", 1), ("d", 1), ("e", 2), ("f", 3)]
    batches = list(batches_by_shape(items, lambda item: item[1], 2))
    # full groups as soon as they fill ([a, c] then [b, e]); the partial ones at the end
    assert batches == [[("a", 1), ("c", 1)], [("b", 2), ("e", 2)], [("d", 1)], [("f", 3)]]


def test_molded_shape_is_one_shape_in_square_mode_and_per_size_in_pad64():
    square = Config(IMAGE_RESIZE_MODE="square", IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128)
    assert molded_shape((40, 90, 3), square) == molded_shape((300, 200, 3), square) == (128, 128)
    pad64 = Config(IMAGE_RESIZE_MODE="pad64", IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=256)
    assert molded_shape((128, 128, 3), pad64) == (128, 128)
    assert molded_shape((128, 200, 3), pad64) == (128, 256)  # 200 padded up to a multiple of 64


def test_images_batch_by_their_molded_shape_in_pad64_mode():
    config = Config.from_yaml("configs/demo.yaml", ["IMAGE_RESIZE_MODE=pad64", "IMAGE_MIN_DIM=64"])
    # Padded to 64x64, 64x128, 64x64, 64x128, 128x64 (scale 1: every short side is >= 64).
    sizes = [(64, 64), (64, 100), (64, 64), (64, 128), (70, 64)]
    batches = list(batches_by_shape(range(len(sizes)),
                                    lambda i: molded_shape(sizes[i], config), config.BATCH_SIZE))
    assert batches == [[0, 2], [1, 3], [4]]


# === Unmolding masks: numpy's bilinear resize against tf.image.resize ===


def tf_unmold_mask(mask, box, image_shape, threshold):
    """unmold_mask as it was, one tf.image.resize per mask, as (bool full-image mask, where the
    resized probability is within 1e-5 of the threshold: float rounding may go either way)."""
    y1, x1, y2, x2 = box
    full = np.zeros(image_shape, dtype=bool)
    near = np.zeros(image_shape, dtype=bool)
    if y2 > y1 and x2 > x1:
        resized = tf.image.resize(mask[..., None], (y2 - y1, x2 - x1), method="bilinear")
        resized = resized.numpy()[..., 0]
        full[y1:y2, x1:x2] = resized >= threshold
        near[y1:y2, x1:x2] = np.abs(resized - threshold) < 1e-5
    return full, near


def random_boxes(rng, image_shape, count):
    """Random (y1, x1, y2, x2) boxes with exclusive ends inside `image_shape`, any size from 1 px
    to the whole image, then the cases to pin: edges, corners, 1 px, a 1 px row and column."""
    height, width = image_shape
    ys = np.sort(rng.integers(0, height + 1, (count, 2)), axis=1)
    xs = np.sort(rng.integers(0, width + 1, (count, 2)), axis=1)
    boxes = [(y1, x1, y2, x2) for (y1, y2), (x1, x2) in zip(ys, xs, strict=True)
             if y2 > y1 and x2 > x1]
    return boxes + [
        (0, 0, height, width),  # the whole image
        (0, 0, 9, 13), (height - 40, width - 70, height, width),  # top-left, bottom-right corners
        (0, 30, 50, width), (20, 0, height, 5),  # touching two edges each
        (0, 0, 1, 1), (height - 1, width - 1, height, width), (40, 40, 41, 41),  # 1 px
        (10, 0, 11, width), (0, 7, height, 8),  # a 1 px row and column across the image
        (5, 6, 7, 90), (3, 4, 60, 6),  # 2 px thin
    ]


@pytest.mark.parametrize("mask_shape", [(28, 28), (14, 21), (56, 40), (1, 1), (3, 2)])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_unmold_mask_thresholds_the_same_bilinear_resize_as_tensorflow(mask_shape, threshold):
    # Noise, not smooth maps: every pixel crosses the threshold somewhere, so a sample point
    # off by a fraction of a pixel (corner-aligned, no clamping) changes many mask pixels.
    rng = np.random.default_rng(sum(mask_shape) + int(threshold * 10))
    image_shape = (96, 160)
    checked = near_threshold = 0
    for box in random_boxes(rng, image_shape, 40):
        mask = rng.uniform(0, 1, mask_shape).astype(np.float32)
        expected, near = tf_unmold_mask(mask, box, image_shape, threshold)
        result = unmold_mask(mask, np.array(box), image_shape, threshold)
        assert result.dtype == bool and result.shape == image_shape
        np.testing.assert_array_equal(result[~near], expected[~near], err_msg=f"box {box}")
        checked += (box[2] - box[0]) * (box[3] - box[1])
        near_threshold += int(near.sum())
    assert near_threshold < checked * 1e-3  # the exemption stays an exception


def test_unmold_mask_of_an_empty_box_is_all_false():
    mask = np.ones((28, 28), np.float32)
    for box in [(10, 10, 10, 20), (10, 10, 20, 10), (30, 10, 20, 20), (10, 30, 20, 20)]:
        result = unmold_mask(mask, np.array(box), (64, 64))
        assert result.shape == (64, 64) and not result.any()


def test_unmold_detections_pastes_each_mask_as_unmold_mask_does():
    rng = np.random.default_rng(0)
    size, count, classes = 256, 30, 4
    sides = rng.integers(20, 121, (count, 2))
    y1, x1 = rng.integers(0, size - sides[:, 0] + 1), rng.integers(0, size - sides[:, 1] + 1)
    pixels = np.stack([y1, x1, y1 + sides[:, 0], x1 + sides[:, 1]], axis=1)
    detections = np.zeros((count + 5, 6), np.float32)  # 5 zero rows: padding
    detections[:count, :4] = (pixels - [0, 0, 1, 1]) / (size - 1)  # norm_boxes
    detections[:count, 4] = rng.integers(1, classes, count)
    detections[:count, 5] = 0.9
    probabilities = rng.uniform(0, 1, (count + 5, 28, 28, classes)).astype(np.float32)

    result = unmold_detections(detections, probabilities, (size, size, 3), (size, size, 3),
                               (0, 0, size, size))

    np.testing.assert_array_equal(result["rois"], pixels)
    assert result["masks"].shape == (size, size, count) and result["masks"].dtype == bool
    for i, class_id in enumerate(result["class_ids"]):
        expected = unmold_mask(probabilities[i, ..., class_id], pixels[i], (size, size))
        np.testing.assert_array_equal(result["masks"][..., i], expected)
