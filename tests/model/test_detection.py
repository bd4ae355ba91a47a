import numpy as np
import tensorflow as tf

from trainer.model.detection import refine_detections


def run(rois, probs, min_confidence=0.7, max_instances=4):
    rois = tf.constant([rois], tf.float32)
    probs = tf.constant([probs], tf.float32)
    deltas = tf.zeros([1, rois.shape[1], probs.shape[-1], 4])
    return refine_detections(rois, probs, deltas, tf.constant([[0.0, 0.0, 1.0, 1.0]]),
                             max_instances=max_instances, min_confidence=min_confidence,
                             nms_threshold=0.3, bbox_std_dev=(0.1, 0.1, 0.2, 0.2)).numpy()[0]


def test_per_class_nms_confidence_and_background():
    box, shifted = [0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5]  # IoU ~0.9
    out = run(
        [box, shifted, shifted, [0.6, 0.6, 0.9, 0.9], [0.6, 0.6, 0.9, 0.9], [0, 0, 0, 0]],
        [[0.1, 0.9, 0.0],    # class 1, 0.9
         [0.2, 0.8, 0.0],    # class 1, overlaps the first: suppressed
         [0.05, 0.0, 0.95],  # class 2 on the same spot: kept (NMS is per class)
         [0.9, 0.1, 0.0],    # background: dropped
         [0.0, 0.35, 0.65],  # below DETECTION_MIN_CONFIDENCE: dropped
         [0.0, 0.0, 1.0]])   # padding ROI: dropped
    np.testing.assert_allclose(out[:, 4:], [[2, 0.95], [1, 0.9], [0, 0], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(out[0, :4], shifted, rtol=1e-6)
    np.testing.assert_allclose(out[1, :4], box, rtol=1e-6)
    assert np.all(out[2:] == 0)


def test_confidence_threshold_is_inclusive_and_count_capped():
    boxes = [[0.1 * i, 0.0, 0.1 * i + 0.05, 0.05] for i in range(6)]
    out = run(boxes, [[0.3, 0.7]] * 6, min_confidence=0.7, max_instances=4)
    assert np.all(out[:, 4] == 1)  # a score equal to the threshold is kept, as matterport


def test_zero_min_confidence_keeps_positive_scores_and_never_padding():
    from trainer.model.detection import nms_score_threshold

    # Not the denormal float32 below 0, whose meaning depends on denormal handling.
    assert nms_score_threshold(0.0) == 0.0
    assert nms_score_threshold(0.7) == float(np.nextafter(np.float32(0.7), np.float32(-1)))
    out = run([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]],
              [[0.3, 0.4, 0.3],     # class 1 at 0.4: kept at threshold 0
               [0.0, 1.0, 0.0]],    # padding ROI: score forced to 0, dropped
              min_confidence=0.0)
    np.testing.assert_allclose(out[:, 4:], [[1, 0.4], [0, 0], [0, 0], [0, 0]], rtol=1e-5)
