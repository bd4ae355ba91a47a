import numpy as np
import tensorflow as tf

from trainer.model.box_ops import (
    MAX_LOG_SCALE,
    apply_box_deltas,
    box_deltas,
    box_iou,
    clip_boxes,
    denorm_boxes,
    norm_boxes,
)
from trainer.model.proposals import nms_padded


def test_box_deltas_literal():
    # box: centre (5, 5), size 10 x 10; target: centre (6, 8), size 10 x 12
    deltas = box_deltas(tf.constant([[0.0, 0.0, 10.0, 10.0]]),
                        tf.constant([[1.0, 2.0, 11.0, 14.0]]))
    np.testing.assert_allclose(deltas.numpy(), [[0.1, 0.3, 0.0, np.log(1.2)]], rtol=1e-6)


def test_deltas_round_trip():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 30, (20, 2))], axis=1)
    targets = boxes + rng.uniform(-3, 3, (20, 4))
    targets[:, 2:] = np.maximum(targets[:, 2:], targets[:, :2] + 0.5)
    decoded = apply_box_deltas(tf.constant(boxes, tf.float32),
                               box_deltas(tf.constant(boxes), tf.constant(targets)))
    np.testing.assert_allclose(decoded.numpy(), targets, rtol=1e-4, atol=1e-4)


def test_apply_deltas_caps_scale_and_stays_finite():
    boxes = tf.constant([[0.0, 0.0, 0.5, 0.5]])
    out = apply_box_deltas(boxes, tf.constant([[0.0, 0.0, 1e4, 1e4]])).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 0.5 * np.exp(MAX_LOG_SCALE), rtol=1e-5)


def test_iou_literal():
    a = tf.constant([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    b = tf.constant([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0],
                     [0.0, 0.0, 0.0, 0.0]])
    expected = [
        [25 / 175, 0.0, 1.0, 0.0],  # 5x5 overlap of two 10x10 boxes; disjoint; equal; empty
        [0.0, 0.0, 0.0, 0.0],  # a degenerate box overlaps nothing (and gives no NaN)
    ]
    np.testing.assert_allclose(box_iou(a, b).numpy(), expected, rtol=1e-6)


def test_clip_and_norm_round_trip():
    clipped = clip_boxes(tf.constant([[-0.2, 0.5, 1.3, 0.9]]), tf.constant([0.0, 0.0, 1.0, 1.0]))
    np.testing.assert_allclose(clipped.numpy(), [[0.0, 0.5, 1.0, 0.9]])
    pixels = tf.constant([[0.0, 0.0, 128.0, 64.0], [10.0, 20.0, 30.0, 40.0]])
    normalized = norm_boxes(pixels, (128, 64))
    np.testing.assert_allclose(normalized.numpy()[0], [0, 0, 1, 1])  # full image -> unit square
    np.testing.assert_allclose(denorm_boxes(normalized, (128, 64)).numpy(), pixels.numpy())


def test_nms_literal():
    boxes = tf.constant([[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0],
                          [0.0, 0.0, 9.0, 9.0]]])
    scores = tf.constant([[0.9, 0.8, 0.7, 0.6]])
    kept = nms_padded(boxes, scores, max_output=4, iou_threshold=0.5).numpy()[0]
    # box 1 overlaps box 0 with IoU 81/119 = 0.68 and box 3 with 81/100: both suppressed.
    np.testing.assert_allclose(kept, [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0], [0, 0, 0, 0]])
    # With a looser threshold, box 1 survives (0.68 < 0.7) and box 3 still goes (0.81).
    kept = nms_padded(boxes, scores, max_output=4, iou_threshold=0.7).numpy()[0]
    np.testing.assert_allclose(kept[:3], [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
