"""Proposal layer: the RPN's best anchors, refined, clipped and thinned by NMS."""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.model.box_ops import apply_box_deltas, clip_boxes


@keras.saving.register_keras_serializable(package="mrcnn")
class ProposalLayer(keras.layers.Layer):
    """Selects `proposal_count` proposals per image.

    Inputs: rpn_probs float32 [B, A, 2], rpn_bbox float32 [B, A, (dy, dx, log(dh), log(dw))]
    (divided by RPN_BBOX_STD_DEV, as the RPN learns them), anchors float32 [A, 4] normalised.
    Output: float32 [B, proposal_count, (y1, x1, y2, x2)] normalised, best first, zero-padded
    when NMS leaves fewer boxes.
    nms: "padded" (`nms_padded`, which XLA compiles) or "kernel" (`nms_kernel`, faster
    where no XLA compiles the step); both select the same boxes.
    """

    def __init__(self, proposal_count: int, nms_threshold: float, pre_nms_limit: int,
                 rpn_bbox_std_dev=(0.1, 0.1, 0.2, 0.2), nms: str = "padded", **kwargs):
        super().__init__(**kwargs)
        if nms not in NMS:
            raise ValueError(f"nms must be one of {sorted(NMS)}, got {nms!r}")
        self.proposal_count = int(proposal_count)
        self.nms_threshold = float(nms_threshold)
        self.pre_nms_limit = int(pre_nms_limit)
        self.rpn_bbox_std_dev = tuple(float(s) for s in rpn_bbox_std_dev)
        self.nms = nms

    def call(self, inputs):
        rpn_probs, rpn_bbox, anchors = inputs
        scores = rpn_probs[..., 1]
        deltas = rpn_bbox * tf.constant(self.rpn_bbox_std_dev)
        # Keep the best-scoring anchors only: NMS over all of them would cost far more.
        limit = tf.minimum(self.pre_nms_limit, tf.shape(anchors)[0])
        top = tf.math.top_k(scores, k=limit, sorted=True)
        deltas = tf.gather(deltas, top.indices, batch_dims=1)
        boxes = apply_box_deltas(tf.gather(anchors, top.indices), deltas)
        boxes = clip_boxes(boxes, tf.constant([0.0, 0.0, 1.0, 1.0]))
        return NMS[self.nms](boxes, top.values, self.proposal_count, self.nms_threshold)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.proposal_count, 4)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "proposal_count": self.proposal_count,
            "nms_threshold": self.nms_threshold,
            "pre_nms_limit": self.pre_nms_limit,
            "rpn_bbox_std_dev": list(self.rpn_bbox_std_dev),
            "nms": self.nms,
        }


def nms_padded(boxes: tf.Tensor, scores: tf.Tensor, max_output: int,
               iou_threshold: float) -> tf.Tensor:
    """Batched greedy NMS that XLA compiles. boxes [B, N, 4] (y1 <= y2, x1 <= x2), scores
    [B, N] sorted descending.

    Returns the kept boxes [B, max_output, 4] in score order, zero rows after the last one.
    `tf.image.non_max_suppression_padded` (static shapes, tiles of boxes suppressed in
    parallel) selects the same boxes in the same order as `tf.image.non_max_suppression`
    (NonMaxSuppressionV3, no XLA kernel), except a box that is all zeros, which it reads as
    padding and never keeps (a proposal clipped to the image's top-left corner: no ROI
    either way). On 2 CPU cores it is as fast at 1000 boxes and faster at 6000.
    """
    num_boxes = boxes.shape[1]
    if num_boxes is not None and num_boxes < max_output:
        # It returns at most N indices: pad the boxes so that the output has max_output rows.
        boxes = tf.pad(boxes, [[0, 0], [0, max_output - num_boxes], [0, 0]])
        scores = tf.pad(scores, [[0, 0], [0, max_output - num_boxes]], constant_values=-1.0)
    keep, valid = tf.image.non_max_suppression_padded(
        boxes, scores, max_output, iou_threshold, pad_to_max_output_size=True,
        sorted_input=True, canonicalized_coordinates=True)
    return _kept_boxes(boxes, keep[:, :max_output], valid)


def nms_kernel(boxes: tf.Tensor, scores: tf.Tensor, max_output: int,
               iou_threshold: float) -> tf.Tensor:
    """`nms_padded`'s selections from TensorFlow's NMS kernel (NonMaxSuppressionV4), one
    image (a loop whose iterations run side by side when the batch size is not known). Same
    inputs and output.

    One kernel per image instead of `non_max_suppression_padded`'s loop of small tensor ops:
    the 256 px setting's proposals (2 images, 16368 anchors, 6000 -> 2000 boxes) took 55 ms
    instead of 90-100 on 2 CPU cores. XLA has no kernel for it. An all-zero box gets no
    score, so that it is never kept, as in `nms_padded`.
    """
    scores = tf.where(tf.reduce_all(tf.equal(boxes, 0.0), axis=-1), -float("inf"), scores)

    def one_image(image):
        image_boxes, image_scores = image
        keep, valid = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes, scores=image_scores, max_output_size=max_output,
            iou_threshold=iou_threshold, score_threshold=tf.float32.min,
            pad_to_max_output_size=True)
        return keep, valid

    if boxes.shape[0] is None:
        keep, valid = tf.map_fn(one_image, (boxes, scores),
                                fn_output_signature=(tf.int32, tf.int32), parallel_iterations=16)
    else:  # a known batch: one kernel per image with no loop between them, free to overlap
        keep, valid = (tf.stack(parts) for parts in zip(
            *(one_image((boxes[i], scores[i])) for i in range(boxes.shape[0]))))
    return _kept_boxes(boxes, keep, valid)


def _kept_boxes(boxes: tf.Tensor, keep: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """boxes [B, N, 4], keep int32 [B, K] indices (padded), valid int32 [B] -> the kept boxes
    [B, K, 4], zero rows after each image's `valid` first."""
    max_output = keep.shape[1]
    is_kept = tf.range(max_output)[None, :] < valid[:, None]
    out = tf.where(is_kept[..., None], tf.gather(boxes, keep, batch_dims=1), 0.0)
    return tf.ensure_shape(out, [None, max_output, 4])


NMS = {"padded": nms_padded, "kernel": nms_kernel}
