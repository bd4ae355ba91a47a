import numpy as np
import tensorflow as tf

from trainer.model import losses


def test_smooth_l1_literal():
    np.testing.assert_allclose(losses.smooth_l1(tf.constant([0.0, 0.5, -0.5, 1.0, -3.0])).numpy(),
                               [0.0, 0.125, 0.125, 0.5, 2.5])


def test_rpn_class_loss_ignores_neutral_anchors():
    match = tf.constant([[1, -1, 0]])
    logits = tf.constant([[[0.0, 2.0], [1.0, 0.0], [50.0, -50.0]]])
    expected = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
    np.testing.assert_allclose(losses.rpn_class_loss(match, logits).numpy(), expected, rtol=1e-6)


def test_rpn_bbox_loss_pairs_positive_anchors_with_compact_targets():
    match = tf.constant([[0, 1, -1, 1], [1, 0, 0, 0]])
    target = tf.constant([[[0.5, 0, 0, 0], [0, 2.0, 0, 0]], [[0, 0, 0, 0.2], [9, 9, 9, 9]]])
    pred = tf.zeros([2, 4, 4])
    # image 0: anchor 1 gets target row 0, anchor 3 row 1; image 1: anchor 0 gets row 0.
    per_anchor = [0.125, 0, 0, 0] + [0, 1.5, 0, 0] + [0, 0, 0, 0.02]
    np.testing.assert_allclose(losses.rpn_bbox_loss(target, match, pred).numpy(),
                               np.mean(per_anchor), rtol=1e-6)


def test_mrcnn_class_loss_counts_valid_active_rois_only():
    targets = tf.constant([[1, 0, 2]])
    logits = tf.constant([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [9.0, 0.0, 0.0]]])
    active = tf.constant([[1.0, 1.0, 1.0]])
    valid = tf.constant([[True, True, False]])
    ce = lambda z, k: -np.log(np.exp(z[k]) / np.exp(z).sum())  # noqa: E731
    expected = np.mean([ce(np.array([0.0, 1, 0]), 1), ce(np.array([1.0, 0, 0]), 0)])
    np.testing.assert_allclose(
        losses.mrcnn_class_loss(targets, logits, active, valid).numpy(), expected, rtol=1e-6)


def test_head_losses_use_the_true_class_and_positives():
    class_ids = tf.constant([[2, 0]])
    pred_bbox = tf.constant([[[[9.0] * 4, [9.0] * 4, [0.5, 0, 0, 0]], [[5.0] * 4] * 3]])
    np.testing.assert_allclose(
        losses.mrcnn_bbox_loss(tf.zeros([1, 2, 4]), class_ids, pred_bbox).numpy(), 0.125 / 4)
    mask_logits = np.zeros((1, 2, 2, 2, 3), np.float32)
    mask_logits[0, 0, :, :, 2] = 100.0  # confident "object" for the true class
    target = np.ones((1, 2, 2, 2), np.float32)
    np.testing.assert_allclose(
        losses.mrcnn_mask_loss(tf.constant(target), class_ids, tf.constant(mask_logits)).numpy(),
        0.0, atol=1e-6)


def test_no_positives_gives_a_connected_zero():
    logits = tf.Variable(tf.ones([1, 2, 2, 2, 3]))
    with tf.GradientTape() as tape:
        loss = losses.mrcnn_mask_loss(tf.zeros([1, 2, 2, 2]), tf.zeros([1, 2], tf.int32), logits)
    grad = tape.gradient(loss, logits)
    assert loss.numpy() == 0.0
    assert grad is not None and np.all(grad.numpy() == 0.0)
