"""Detection layer: final boxes from classified, refined ROIs, with per-class NMS."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.model.box_ops import apply_box_deltas, box_area, clip_boxes, norm_boxes
from trainer.model.image_meta import parse_image_meta


def nms_score_threshold(min_confidence: float) -> float:
    """combined NMS keeps scores strictly above its threshold; matterport keeps scores >=
    min_confidence: the float32 just below it. For 0 that would be a denormal (-1.4e-45), read
    as 0 or not depending on the hardware's denormal handling: 0 itself is used (every
    positive score is kept; padding ROIs score exactly 0 and never detect)."""
    if min_confidence <= 0.0:
        return 0.0
    return float(np.nextafter(np.float32(min_confidence), np.float32(-1.0)))


def refine_detections(rois, probs, deltas, window, *, max_instances: int, min_confidence: float,
                      nms_threshold: float, bbox_std_dev) -> tf.Tensor:
    """Matterport's refinement, batched.

    rois [B, N, 4] normalised; probs [B, N, C]; deltas [B, N, C, 4]; window [B, 4] normalised
    (the image inside the padding). Each ROI takes its most probable class and that class's
    box refinement, clipped to the window; background, padding and ROIs scoring below
    `min_confidence` drop out; NMS runs per class; the best `max_instances` remain.
    Returns float32 [B, max_instances, (y1, x1, y2, x2, class_id, score)], zero rows at the end.
    """
    num_classes = probs.shape[-1]
    class_ids = tf.argmax(probs, axis=-1, output_type=tf.int32)  # [B, N]
    scores = tf.reduce_max(probs, axis=-1)
    class_deltas = tf.gather(deltas, class_ids, batch_dims=2)  # [B, N, 4]
    boxes = apply_box_deltas(rois, class_deltas * tf.constant(bbox_std_dev, tf.float32))
    boxes = clip_boxes(boxes, window[:, None, :])
    scores = tf.where(box_area(rois) > 0.0, scores, 0.0)  # padding ROIs never detect
    # One score column per foreground class, non-zero only for the ROI's own class:
    # combined NMS then suppresses within a class only, as matterport's per-class loop.
    per_class = tf.one_hot(class_ids, num_classes) * scores[..., None]
    nms = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :], per_class[..., 1:],
        max_output_size_per_class=max_instances, max_total_size=max_instances,
        iou_threshold=nms_threshold,
        score_threshold=nms_score_threshold(min_confidence),
        clip_boxes=False,
    )
    kept = tf.range(max_instances)[None, :] < nms.valid_detections[:, None]
    detections = tf.concat(
        [nms.nmsed_boxes, (nms.nmsed_classes + 1.0)[..., None], nms.nmsed_scores[..., None]], -1)
    return tf.where(kept[..., None], detections, 0.0)


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionLayer(keras.layers.Layer):
    """Inputs: [rois [B, N, 4], mrcnn_class [B, N, C], mrcnn_bbox [B, N, C, 4], image_meta].
    Output: detections [B, max_instances, (y1, x1, y2, x2, class_id, score)] normalised."""

    def __init__(self, max_instances: int, min_confidence: float, nms_threshold: float,
                 bbox_std_dev, **kwargs):
        super().__init__(**kwargs)
        self.supports_jit = False  # CombinedNonMaxSuppression has no XLA kernel
        self.max_instances = int(max_instances)
        self.min_confidence = float(min_confidence)
        self.nms_threshold = float(nms_threshold)
        self.bbox_std_dev = tuple(float(s) for s in bbox_std_dev)

    def call(self, inputs):
        rois, probs, deltas, image_meta = inputs
        meta = parse_image_meta(image_meta)
        window = norm_boxes(meta["window"], meta["image_shape"][0, :2])
        return refine_detections(
            rois, probs, deltas, window, max_instances=self.max_instances,
            min_confidence=self.min_confidence, nms_threshold=self.nms_threshold,
            bbox_std_dev=self.bbox_std_dev)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.max_instances, 6)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "max_instances": self.max_instances,
            "min_confidence": self.min_confidence,
            "nms_threshold": self.nms_threshold,
            "bbox_std_dev": list(self.bbox_std_dev),
        }
