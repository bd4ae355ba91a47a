"""The five Mask R-CNN losses: pure functions of targets and predictions.

Each is a mean over the elements that take part (matterport's normalisation) and an exact,
graph-connected zero when none do (an image without objects has no positive ROI).
Loss weights are not applied here: the training model applies LOSS_WEIGHTS once.
"""

from __future__ import annotations

import math

import tensorflow as tf


def smooth_l1(diff: tf.Tensor) -> tf.Tensor:
    """Elementwise Huber loss with delta 1: 0.5 d^2 where |d| < 1, |d| - 0.5 elsewhere."""
    diff = tf.abs(diff)
    return tf.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)


def _masked_mean(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    weights = tf.cast(weights, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))


def rpn_class_loss(rpn_match: tf.Tensor, rpn_class_logits: tf.Tensor) -> tf.Tensor:
    """rpn_match int [B, A] (1, -1, 0 = neutral, ignored); logits [B, A, 2] -> scalar."""
    rpn_match = tf.cast(rpn_match, tf.int32)
    labels = tf.cast(rpn_match == 1, tf.int32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=rpn_class_logits)
    return _masked_mean(loss, rpn_match != 0)


def rpn_bbox_loss(target_bbox: tf.Tensor, rpn_match: tf.Tensor, rpn_bbox: tf.Tensor) -> tf.Tensor:
    """Smooth-L1 on positive anchors.

    target_bbox [B, R, 4]: the positive anchors' deltas in anchor order, zero-padded;
    rpn_match int [B, A]; rpn_bbox [B, A, 4] predicted deltas -> scalar.
    """
    positive = tf.cast(rpn_match, tf.int32) == 1
    # The k-th positive anchor of an image owns row k of its target_bbox.
    row = tf.cumsum(tf.cast(positive, tf.int32), axis=1) - 1
    row = tf.clip_by_value(row, 0, tf.shape(target_bbox)[1] - 1)
    target = tf.gather(target_bbox, row, batch_dims=1)  # [B, A, 4]
    loss = smooth_l1(target - rpn_bbox)
    return _masked_mean(loss, tf.broadcast_to(positive[..., None], tf.shape(loss)))


def mrcnn_class_loss(target_class_ids: tf.Tensor, class_logits: tf.Tensor,
                     active_class_ids: tf.Tensor, roi_valid: tf.Tensor) -> tf.Tensor:
    """Cross-entropy over sampled ROIs.

    target_class_ids int [B, T]; class_logits [B, T, C]; active_class_ids [B, C] (1 where the
    image's dataset has the class); roi_valid bool [B, T]. As matterport, an ROI whose
    predicted class is not in its image's dataset is left out of the loss.
    """
    target_class_ids = tf.cast(target_class_ids, tf.int32)
    predicted = tf.argmax(class_logits, axis=-1, output_type=tf.int32)
    active = tf.gather(tf.cast(active_class_ids, tf.float32), predicted, batch_dims=1)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target_class_ids,
                                                          logits=class_logits)
    return _masked_mean(loss, active * tf.cast(roi_valid, tf.float32))


def mrcnn_bbox_loss(target_bbox: tf.Tensor, target_class_ids: tf.Tensor,
                    pred_bbox: tf.Tensor) -> tf.Tensor:
    """Smooth-L1 of the true class's deltas on positive ROIs.

    target_bbox [B, T, 4]; target_class_ids int [B, T]; pred_bbox [B, T, C, 4] -> scalar.
    """
    target_class_ids = tf.cast(target_class_ids, tf.int32)
    pred = tf.gather(pred_bbox, tf.maximum(target_class_ids, 0), batch_dims=2)  # [B, T, 4]
    loss = smooth_l1(target_bbox - pred)
    positive = tf.broadcast_to((target_class_ids > 0)[..., None], tf.shape(loss))
    return _masked_mean(loss, positive)


def mrcnn_mask_loss(target_masks: tf.Tensor, target_class_ids: tf.Tensor,
                    mask_logits: tf.Tensor) -> tf.Tensor:
    """Per-pixel binary cross-entropy of the true class's mask on positive ROIs.

    target_masks [B, P, h, w] of 0/1; target_class_ids int [B, P]; mask_logits
    [B, P, h, w, C] -> scalar (mean over positive ROIs' pixels).
    """
    target_class_ids = tf.cast(target_class_ids, tf.int32)
    logits = tf.transpose(mask_logits, [0, 1, 4, 2, 3])  # [B, P, C, h, w]
    logits = tf.gather(logits, tf.maximum(target_class_ids, 0), batch_dims=2)  # [B, P, h, w]
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=target_masks, logits=logits)
    positive = tf.broadcast_to((target_class_ids > 0)[..., None, None], tf.shape(loss))
    return _masked_mean(loss, positive)


def _decayed(variable) -> bool:
    """Matterport's L2 leaves BatchNorm's gamma and beta out."""
    return not (variable.name.endswith("gamma") or variable.name.endswith("beta"))


def weight_decay_loss(variables, weight_decay: float) -> tf.Tensor:
    """Matterport's L2: sum over trainable weights, except BatchNorm gamma and beta, of
    weight_decay * sum(w ** 2) / size(w)."""
    # l2_loss (sum(w ** 2) / 2) is one pass over w; square-then-sum made a temporary copy of
    # every weight (176 MB for ResNet-50) each step.
    terms = [
        weight_decay * 2.0 * tf.nn.l2_loss(v) / tf.cast(tf.size(v), tf.float32)
        for v in variables if _decayed(v)
    ]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def add_weight_decay_gradients(gradients: list, variables, weight_decay: float,
                               scale: tf.Tensor | float = 1.0) -> list:
    """`gradients` (of the variables, taken without the L2 term) plus `scale` times the
    gradient of `weight_decay_loss`: 2 * weight_decay * w / size(w) for each decayed variable.

    The same sum as differentiating the L2 term with the rest of the loss, with one difference
    in when it happens: each decay term is made after its variable's loss gradient exists and
    added to it at once. Through the tape those terms depend on the weights alone, so the
    executor made all of them (one more copy of the weights, 176 MB for ResNet-50) early in the
    backward pass and held them to its end, on top of the activations.
    """
    if weight_decay == 0.0:
        return list(gradients)
    summed = []
    for gradient, variable in zip(gradients, variables, strict=True):
        if not _decayed(variable):
            summed.append(gradient)
            continue
        coefficient = 2.0 * weight_decay / math.prod(variable.shape)
        if gradient is None:  # not on the loss's path: the L2 term alone
            summed.append(tf.cast(scale, variable.dtype) * coefficient * variable)
            continue
        gradient = tf.convert_to_tensor(gradient)
        with tf.control_dependencies([gradient]):
            decay = (tf.cast(scale, variable.dtype) * coefficient) * tf.identity(variable)
        summed.append(gradient + tf.cast(decay, gradient.dtype))
    return summed
