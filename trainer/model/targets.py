"""Target assignment: what the RPN and the heads should have predicted, in fixed-size tensors.

Ground truth arrives padded to MAX_GT_INSTANCES; its class id says what each slot is:
positive = an object, negative = a crowd region (COCO `iscrowd`: never a negative example,
never a target), zero = padding.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.model.box_ops import box_area, box_deltas, box_iou
from trainer.model.roi_align import multilevel_crop_and_resize

# Matterport's matching thresholds.
RPN_POSITIVE_IOU = 0.7
RPN_NEGATIVE_IOU = 0.3
ROI_POSITIVE_IOU = 0.5
CROWD_IOU = 0.001  # an anchor/ROI touching a crowd region more than this is never a negative


def _random_subset(candidates: tf.Tensor, count: tf.Tensor, max_count: int) -> tf.Tensor:
    """A uniformly random subset of at most `count` of the True entries of `candidates` [N].

    `max_count` is a bound on `count`. Returns bool [N].
    """
    scores = tf.where(candidates, tf.random.uniform(tf.shape(candidates)), -1.0)
    max_count = tf.minimum(max_count, tf.size(candidates))
    top = tf.math.top_k(scores, k=max_count, sorted=True).values
    count = tf.clip_by_value(count, 0, max_count)
    threshold = tf.gather(top, tf.maximum(count - 1, 0))
    return candidates & (scores >= threshold) & (count > 0)


def rpn_targets(anchors: tf.Tensor, gt_class_ids: tf.Tensor, gt_boxes: tf.Tensor,
                anchors_per_image: int, rpn_bbox_std_dev) -> tuple[tf.Tensor, tf.Tensor]:
    """RPN targets of one image, in TensorFlow (the input pipeline calls it in `tf.data`).

    anchors: float32 [A, (y1, x1, y2, x2)] pixels; gt_class_ids: int32 [G] (padding 0, crowd
    < 0); gt_boxes: [G, 4] pixels.
    Returns rpn_match int32 [A] (1 positive, -1 negative, 0 neutral) with at most
    `anchors_per_image` non-neutral anchors, at most half of them positive; and rpn_bbox
    float32 [anchors_per_image, (dy, dx, log(dh), log(dw))] / RPN_BBOX_STD_DEV for the positive
    anchors in anchor order, zero-padded.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    is_object = gt_class_ids > 0
    is_crowd = gt_class_ids < 0
    iou = box_iou(anchors, gt_boxes)  # [A, G]
    crowd_iou = tf.reduce_max(tf.where(is_crowd[None, :], iou, 0.0), axis=1)
    object_iou = tf.where(is_object[None, :], iou, -1.0)
    best_iou = tf.reduce_max(object_iou, axis=1)  # [A]
    best_gt = tf.argmax(tf.concat([object_iou, -2.0 * tf.ones_like(iou[:, :1])], 1), axis=1)

    match = tf.where((best_iou < RPN_NEGATIVE_IOU) & (crowd_iou < CROWD_IOU), -1, 0)
    # Every object gets the anchor(s) that overlap it most, however low the overlap.
    gt_best = tf.reduce_max(object_iou, axis=0)  # [G]
    is_best = tf.reduce_any(
        (object_iou >= gt_best[None, :]) & is_object[None, :] & (gt_best[None, :] > 0.0), axis=1
    )
    match = tf.where(is_best | (best_iou >= RPN_POSITIVE_IOU), 1, match)

    # Balance: at most half positives, negatives fill the rest.
    max_positive = anchors_per_image // 2
    positive = _random_subset(match == 1, max_positive, max_positive)
    num_negative = anchors_per_image - tf.reduce_sum(tf.cast(positive, tf.int32))
    negative = _random_subset(match == -1, num_negative, anchors_per_image)
    match = tf.where(positive, 1, tf.where(negative, -1, 0))

    positive_ix = tf.where(positive)[:, 0]
    deltas = box_deltas(tf.gather(anchors, positive_ix),
                        tf.gather(gt_boxes, tf.gather(best_gt, positive_ix)))
    deltas /= tf.constant(rpn_bbox_std_dev, tf.float32)
    deltas = tf.pad(deltas, [[0, anchors_per_image - tf.shape(deltas)[0]], [0, 0]])
    return tf.cast(match, tf.int32), tf.ensure_shape(deltas, [anchors_per_image, 4])


def detection_targets(proposals, gt_class_ids, gt_boxes, gt_masks, *, rois_per_image: int,
                      positive_ratio: float, bbox_std_dev, mask_shape, use_mini_mask: bool,
                      include_gt: bool = False):
    """Samples ROIs from proposals and builds the heads' targets, for a whole batch.

    proposals: float32 [B, N, 4] normalised, zero rows are padding
    gt_class_ids: int32 [B, G]; gt_boxes: float32 [B, G, 4] normalised
    gt_masks: bool or 0/1 [B, h, w, G], full-image masks, or mini-masks (each resized from its box)
    Returns, with P = int(rois_per_image * positive_ratio) positive slots first:
      rois float32 [B, T, 4] (T = rois_per_image): positives in [0, P), negatives after,
        zero rows where a slot is unused
      class_ids int32 [B, T]: the object's class for positives, 0 otherwise
      deltas float32 [B, T, 4]: box refinement / BBOX_STD_DEV for positives, 0 otherwise
      masks float32 [B, P, mask_h, mask_w]: 0/1 mask of each positive inside its ROI
      valid bool [B, T]: the slot holds a sampled ROI (for the classifier's loss)
    Negatives keep matterport's ratio: int(positives / positive_ratio) - positives of them.
    include_gt: the objects' own boxes join the proposals (torchvision's and Detectron2's
    sampling; not matterport's), so the heads see positive ROIs from the first step, before
    the RPN proposes anything near an object.
    """
    if include_gt:
        object_boxes = tf.where((gt_class_ids > 0)[..., None], gt_boxes, 0.0)
        proposals = tf.concat([proposals, tf.cast(object_boxes, proposals.dtype)], axis=1)
    max_positive = int(rois_per_image * positive_ratio)
    max_negative = rois_per_image - max_positive
    proposal_ok = box_area(proposals) > 0.0
    is_object = gt_class_ids > 0
    iou = box_iou(proposals, gt_boxes)  # [B, N, G]
    crowd_iou = tf.reduce_max(tf.where((gt_class_ids < 0)[:, None, :], iou, 0.0), -1)
    object_iou = tf.where(is_object[:, None, :], iou, -1.0)
    best_iou = tf.reduce_max(object_iou, axis=-1)
    best_gt = tf.argmax(object_iou, axis=-1, output_type=tf.int32)  # [B, N]
    positive = proposal_ok & (best_iou >= ROI_POSITIVE_IOU)
    negative = proposal_ok & (best_iou < ROI_POSITIVE_IOU) & (crowd_iou < CROWD_IOU)

    def pick(candidates, count, slots):
        """Indices [B, slots] of a random subset of each row's candidates, and their validity."""
        scores = tf.where(candidates, tf.random.uniform(tf.shape(candidates)), -1.0)
        top = tf.math.top_k(scores, k=slots, sorted=True)
        valid = (top.values >= 0.0) & (tf.range(slots)[None, :] < count[:, None])
        return top.indices, valid

    num_proposals = tf.shape(proposals)[1]
    pos_ix, pos_valid = pick(positive, tf.fill([tf.shape(proposals)[0]], max_positive),
                             tf.minimum(max_positive, num_proposals))
    pos_count = tf.reduce_sum(tf.cast(pos_valid, tf.int32), axis=1)
    neg_count = tf.cast(tf.cast(pos_count, tf.float32) / positive_ratio, tf.int32) - pos_count
    neg_ix, neg_valid = pick(negative, neg_count, tf.minimum(max_negative, num_proposals))

    def gather_rows(values, ix, valid):
        """values [B, N, 4] -> the rows at ix [B, S], zeros where not valid."""
        return tf.where(valid[..., None], tf.gather(values, ix, batch_dims=1), 0.0)

    pos_rois = gather_rows(proposals, pos_ix, pos_valid)
    assigned = tf.gather(best_gt, pos_ix, batch_dims=1)  # [B, P]
    assigned_boxes = tf.gather(gt_boxes, assigned, batch_dims=1)
    pos_class_ids = tf.where(pos_valid, tf.gather(gt_class_ids, assigned, batch_dims=1), 0)
    pos_deltas = tf.where(
        pos_valid[..., None],
        box_deltas(pos_rois, assigned_boxes) / tf.constant(bbox_std_dev, tf.float32),
        0.0,
    )
    masks = _mask_targets(pos_rois, assigned, assigned_boxes, gt_masks, mask_shape,
                          use_mini_mask)
    masks = tf.where(pos_valid[..., None, None], masks, 0.0)

    def to_slots(values, slots):
        pad = [[0, 0], [0, slots - tf.shape(values)[1]]] + [[0, 0]] * (values.shape.rank - 2)
        return tf.pad(values, pad)

    neg_rois = gather_rows(proposals, neg_ix, neg_valid)
    rois = tf.concat([to_slots(pos_rois, max_positive), to_slots(neg_rois, max_negative)], 1)
    class_ids = to_slots(pos_class_ids, rois_per_image)
    deltas = to_slots(pos_deltas, rois_per_image)
    valid = tf.concat([to_slots(pos_valid, max_positive), to_slots(neg_valid, max_negative)], 1)
    masks = to_slots(masks, max_positive)
    batch = proposals.shape[0]
    return (
        tf.ensure_shape(rois, [batch, rois_per_image, 4]),
        tf.ensure_shape(tf.cast(class_ids, tf.int32), [batch, rois_per_image]),
        tf.ensure_shape(deltas, [batch, rois_per_image, 4]),
        tf.ensure_shape(masks, [batch, max_positive, *mask_shape]),
        tf.ensure_shape(valid, [batch, rois_per_image]),
    )


def _mask_targets(rois, gt_index, gt_boxes, gt_masks, mask_shape, use_mini_mask):
    """Crops each ROI's assigned gt mask to the ROI and resizes it to mask_shape (0/1).

    rois, gt_boxes: [B, P, 4] normalised; gt_index int32 [B, P]; gt_masks bool or 0/1 [B, h, w, G].
    """
    boxes = rois
    if use_mini_mask:
        # A mini-mask spans its gt box: express the ROI in that box's unit square.
        height = gt_boxes[..., 2] - gt_boxes[..., 0]
        width = gt_boxes[..., 3] - gt_boxes[..., 1]
        size = tf.stack([height, width, height, width], axis=-1)
        origin = tf.stack([gt_boxes[..., 0], gt_boxes[..., 1]] * 2, axis=-1)
        boxes = tf.math.divide_no_nan(rois - origin, size)
    num_gt = tf.shape(gt_masks)[3]
    # One single-channel image per gt instance: [B * G, h, w, 1].
    images = tf.reshape(tf.transpose(tf.cast(gt_masks, tf.float32), [0, 3, 1, 2]),
                        [-1, tf.shape(gt_masks)[1], tf.shape(gt_masks)[2], 1])
    image_ix = tf.range(tf.shape(rois)[0])[:, None] * num_gt + gt_index
    crops = multilevel_crop_and_resize([images], boxes, tf.zeros_like(gt_index), mask_shape,
                                       image_indices=image_ix)
    return tf.round(crops[..., 0])


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionTargetLayer(keras.layers.Layer):
    """`detection_targets` as a layer (no weights). Inputs: [proposals, gt_class_ids,
    gt_boxes (normalised), gt_masks]; outputs: [rois, target_class_ids, target_bbox,
    target_mask, roi_valid]."""

    def __init__(self, rois_per_image: int, positive_ratio: float, bbox_std_dev, mask_shape,
                 use_mini_mask: bool, include_gt: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.include_gt = bool(include_gt)
        self.rois_per_image = int(rois_per_image)
        self.positive_ratio = float(positive_ratio)
        self.bbox_std_dev = tuple(float(s) for s in bbox_std_dev)
        self.mask_shape = tuple(int(s) for s in mask_shape)
        self.use_mini_mask = bool(use_mini_mask)

    def call(self, inputs):
        proposals, gt_class_ids, gt_boxes, gt_masks = inputs
        outputs = detection_targets(
            tf.stop_gradient(proposals), tf.cast(gt_class_ids, tf.int32), gt_boxes, gt_masks,
            rois_per_image=self.rois_per_image, positive_ratio=self.positive_ratio,
            bbox_std_dev=self.bbox_std_dev, mask_shape=self.mask_shape,
            use_mini_mask=self.use_mini_mask, include_gt=self.include_gt)
        return [tf.stop_gradient(t) for t in outputs]

    def compute_output_shape(self, input_shape):
        batch = input_shape[0][0]
        positives = int(self.rois_per_image * self.positive_ratio)
        return [
            (batch, self.rois_per_image, 4),
            (batch, self.rois_per_image),
            (batch, self.rois_per_image, 4),
            (batch, positives, *self.mask_shape),
            (batch, self.rois_per_image),
        ]

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape([tuple(t.shape) for t in inputs])
        dtypes = ["float32", "int32", "float32", "float32", "bool"]
        return [keras.KerasTensor(s, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "rois_per_image": self.rois_per_image,
            "positive_ratio": self.positive_ratio,
            "bbox_std_dev": list(self.bbox_std_dev),
            "mask_shape": list(self.mask_shape),
            "use_mini_mask": self.use_mini_mask,
            "include_gt": self.include_gt,
        }
