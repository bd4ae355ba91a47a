"""Mask R-CNN graphs for training and inference: wiring only.

Both graphs are built from the same named layers, so weights move between them (and from
matterport's h5 files) by layer name. The training model returns predictions and targets;
`MaskRCNNTrainingModel` computes the losses from them in its train/test steps.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from trainer.config import LOSS_NAMES, Config
from trainer.model import losses
from trainer.model.anchors import AnchorsLayer
from trainer.model.backbone import resnet_graph
from trainer.model.box_ops import NormBoxes
from trainer.model.detection import DetectionLayer
from trainer.model.fpn import fpn_graph
from trainer.model.heads import PositiveRois, ToSlots, classifier_head, mask_head
from trainer.model.image_meta import parse_image_meta
from trainer.model.proposals import ProposalLayer
from trainer.model.rpn import build_rpn_model, rpn_graph
from trainer.model.targets import DetectionTargetLayer


def _image_input(config: Config) -> keras.KerasTensor:
    # square and crop modes give one fixed size; pad64 and none give any multiple of 64.
    side = None if config.IMAGE_RESIZE_MODE in ("pad64", "none") else int(config.IMAGE_SHAPE[0])
    return keras.Input(shape=(side, side, config.IMAGE_CHANNEL_COUNT), name="input_image")


def compute_policy(config: Config) -> str | None:
    """The Keras dtype policy of the backbone, FPN, RPN and head layers: None (the global
    policy, float32) or "mixed_float16" / "mixed_bfloat16" (MIXED_PRECISION): they compute in
    half precision on float32 weights. Everything else (anchors, box arithmetic, proposals and
    their NMS, ROI pooling, targets, probabilities, losses) stays float32."""
    return None if config.MIXED_PRECISION == "none" else f"mixed_{config.MIXED_PRECISION}"


def roi_sampler(config: Config) -> str:
    """The ROIAlign sampler (`roi_align`): TensorFlow's CropAndResize kernels, whose gradient
    adds into the feature maps directly (the faster and leaner on CPU: 256 px step), or, when
    XLA compiles the step (JIT_COMPILE), gathers, which XLA can compile."""
    return "gather" if config.JIT_COMPILE else "crop_and_resize"


def proposal_nms(config: Config) -> str:
    """The proposals' NMS (`ProposalLayer`): TensorFlow's NMS kernel, one per image, or, when
    XLA compiles the step (JIT_COMPILE), `non_max_suppression_padded`, which XLA can compile.
    Both select the same boxes."""
    return "padded" if config.JIT_COMPILE else "kernel"


def _shared_graph(config: Config, image, proposal_count: int):
    """Backbone, FPN, RPN and proposals: what both modes share."""
    dtype = compute_policy(config)
    c2, c3, c4, c5 = resnet_graph(image, config.BACKBONE, config.TRAIN_BN, config.NORM,
                                  dtype=dtype)
    pyramid = fpn_graph(c2, c3, c4, c5, config.TOP_DOWN_PYRAMID_SIZE,
                        norm=None if config.NORM == "batch" else config.NORM, dtype=dtype)
    # The losses read few anchors: the shared conv's gradients skip the rest, except under XLA.
    rpn = build_rpn_model(config.RPN_ANCHOR_STRIDE, config.ANCHORS_PER_LOCATION,
                          config.TOP_DOWN_PYRAMID_SIZE, dtype=dtype,
                          sparse_output_gradient=not config.JIT_COMPILE)
    rpn_class_logits, rpn_class, rpn_bbox = rpn_graph(rpn, pyramid)
    anchors = AnchorsLayer(config.RPN_ANCHOR_SCALES, config.RPN_ANCHOR_RATIOS,
                           config.BACKBONE_STRIDES, config.RPN_ANCHOR_STRIDE,
                           name="anchors")(image)
    rpn_rois = ProposalLayer(proposal_count, config.RPN_NMS_THRESHOLD, config.PRE_NMS_LIMIT,
                             config.RPN_BBOX_STD_DEV, nms=proposal_nms(config),
                             name="ROI")([rpn_class, rpn_bbox, anchors])
    return pyramid[:4], rpn_class_logits, rpn_class, rpn_bbox, rpn_rois


def build_training_model(config: Config) -> MaskRCNNTrainingModel:
    """The training graph. Inputs (batch first): input_image float32 [H, W, C] (molded),
    input_image_meta [META], input_rpn_match int32 [A], input_rpn_bbox [R, 4],
    input_gt_class_ids int32 [G], input_gt_boxes [G, 4] pixels, input_gt_masks uint8
    [h, w, G] of 0/1 (mini-masks when USE_MINI_MASK; not bool: Keras' distributed build
    averages a batch, which bool tensors cannot do)."""
    dtype, sampler = compute_policy(config), roi_sampler(config)  # of the heads
    image = _image_input(config)
    mask_hw = config.MINI_MASK_SHAPE if config.USE_MINI_MASK else (None, None)
    inputs = {
        "input_image": image,
        "input_image_meta": keras.Input((config.IMAGE_META_SIZE,), name="input_image_meta"),
        "input_rpn_match": keras.Input((None,), dtype="int32", name="input_rpn_match"),
        "input_rpn_bbox": keras.Input((config.RPN_TRAIN_ANCHORS_PER_IMAGE, 4),
                                      name="input_rpn_bbox"),
        "input_gt_class_ids": keras.Input((config.MAX_GT_INSTANCES,), dtype="int32",
                                          name="input_gt_class_ids"),
        "input_gt_boxes": keras.Input((config.MAX_GT_INSTANCES, 4), name="input_gt_boxes"),
        "input_gt_masks": keras.Input((*mask_hw, config.MAX_GT_INSTANCES), dtype="uint8",
                                      name="input_gt_masks"),
    }
    meta = inputs["input_image_meta"]
    feature_maps, rpn_class_logits, _, rpn_bbox, rpn_rois = _shared_graph(
        config, image, config.POST_NMS_ROIS_TRAINING)
    gt_boxes = NormBoxes(name="norm_gt_boxes")([inputs["input_gt_boxes"], image])
    rois, target_class_ids, target_bbox, target_mask, roi_valid = DetectionTargetLayer(
        config.TRAIN_ROIS_PER_IMAGE, config.ROI_POSITIVE_RATIO, config.BBOX_STD_DEV,
        config.MASK_SHAPE, config.USE_MINI_MASK, include_gt=config.PROPOSALS_INCLUDE_GT,
        name="proposal_targets",
    )([rpn_rois, inputs["input_gt_class_ids"], gt_boxes, inputs["input_gt_masks"]])
    class_logits, _, bbox = classifier_head(
        rois, feature_maps, meta, pool_size=config.POOL_SIZE, num_classes=config.NUM_CLASSES,
        train_bn=config.TRAIN_BN, fc_size=config.FPN_CLASSIF_FC_LAYERS_SIZE, norm=config.NORM,
        dtype=dtype, sampler=sampler)
    # Only positive ROIs (the first MAX_POSITIVE_ROIS slots) have mask targets: running the
    # mask head on the others would cost most of the step and change nothing. Its BatchNorm
    # statistics come from the slots that hold a positive ROI (not from padding).
    slots = config.MAX_POSITIVE_ROIS
    head = _mask_head_settings(config, dtype, sampler)
    if _mask_head_on_found(config):  # the positives found
        mask_logits = _mask_head_in_slots(rois, roi_valid, slots, feature_maps, meta, head,
                                          names=("positive_rois", "positive_slots"))
    else:  # all MAX_POSITIVE_ROIS slots: fixed shapes for XLA
        positive_rois = layers.Lambda(lambda r: r[:, :slots], name="positive_rois")(rois)
        positive_valid = layers.Lambda(lambda v: v[:, :slots], name="positive_valid")(roi_valid)
        mask_logits = mask_head(positive_rois, feature_maps, meta, roi_valid=positive_valid,
                                **head)
    outputs = {
        "rpn_class_logits": rpn_class_logits,
        "rpn_bbox": rpn_bbox,
        "rpn_rois": rpn_rois,
        "rois": rois,
        "target_class_ids": target_class_ids,
        "target_bbox": target_bbox,
        "target_mask": target_mask,
        "roi_valid": roi_valid,
        "mrcnn_class_logits": class_logits,
        "mrcnn_bbox": bbox,
        "mrcnn_mask_logits": mask_logits,
    }
    return MaskRCNNTrainingModel(
        inputs=inputs, outputs=outputs, loss_weights=config.LOSS_WEIGHTS,
        # AdamW applies WEIGHT_DECAY itself (decoupled): no L2 term in the loss then.
        weight_decay=0.0 if config.OPTIMIZER == "adamw" else config.WEIGHT_DECAY,
        name="mask_rcnn")


def build_inference_model(config: Config) -> keras.Model:
    """The inference graph. Inputs: input_image [H, W, C] (molded), input_image_meta [META].
    Outputs (matterport's order): detections [N, (y1, x1, y2, x2, class_id, score)] normalised,
    mrcnn_class [R, C], mrcnn_bbox [R, C, 4], mrcnn_mask [N, h, w, C] probabilities,
    rpn_rois [R, 4], rpn_class [A, 2], rpn_bbox [A, 4]."""
    dtype, sampler = compute_policy(config), roi_sampler(config)  # of the heads
    image = _image_input(config)
    meta = keras.Input((config.IMAGE_META_SIZE,), name="input_image_meta")
    feature_maps, _, rpn_class, rpn_bbox, rpn_rois = _shared_graph(
        config, image, config.POST_NMS_ROIS_INFERENCE)
    _, class_probs, bbox = classifier_head(
        rpn_rois, feature_maps, meta, pool_size=config.POOL_SIZE, num_classes=config.NUM_CLASSES,
        train_bn=config.TRAIN_BN, fc_size=config.FPN_CLASSIF_FC_LAYERS_SIZE, norm=config.NORM,
        dtype=dtype, sampler=sampler)
    detections = DetectionLayer(
        config.DETECTION_MAX_INSTANCES, config.DETECTION_MIN_CONFIDENCE,
        config.DETECTION_NMS_THRESHOLD, config.BBOX_STD_DEV, name="mrcnn_detection",
    )([rpn_rois, class_probs, bbox, meta])
    detection_boxes = layers.Lambda(lambda d: d[..., :4], name="detection_boxes")(detections)
    head = _mask_head_settings(config, dtype, sampler)
    if _mask_head_on_found(config):
        # The detections found, not the DETECTION_MAX_INSTANCES slots: a trained model fills
        # few of them, and the mask head costs ~6 ms per slot at 256 px on 2 CPU cores. The
        # empty slots' masks are sigmoid(0) = 0.5 (their detection rows are zeros).
        detected = layers.Lambda(lambda d: d[..., 4] > 0, name="detection_valid")(detections)
        mask_logits = _mask_head_in_slots(detection_boxes, detected,
                                          config.DETECTION_MAX_INSTANCES, feature_maps, meta,
                                          head, names=("detected_rois", "detection_slots"))
    else:  # every slot: fixed shapes for XLA
        mask_logits = mask_head(detection_boxes, feature_maps, meta, **head)
    masks = layers.Activation("sigmoid", name="mrcnn_mask_probs", dtype="float32")(mask_logits)
    return keras.Model(
        [image, meta], [detections, class_probs, bbox, masks, rpn_rois, rpn_class, rpn_bbox],
        name="mask_rcnn")


def _mask_head_on_found(config: Config) -> bool:
    """MASK_HEAD_ROIS: the mask head on the ROIs found (a run-time shape) or on every slot; XLA
    needs fixed shapes, so JIT_COMPILE takes the slots whatever it says."""
    return config.MASK_HEAD_ROIS == "dynamic" and not config.JIT_COMPILE


def _mask_head_settings(config: Config, dtype, sampler) -> dict:
    """`mask_head`'s keyword arguments that come from the config."""
    return dict(pool_size=config.MASK_POOL_SIZE, num_classes=config.NUM_CLASSES,
                train_bn=config.TRAIN_BN, norm=config.NORM, dtype=dtype, sampler=sampler)


def _mask_head_in_slots(rois, valid, slots: int, feature_maps, meta, head: dict, names):
    """The mask head on the valid ones of the first `slots` ROIs only (`PositiveRois`), its
    logits put back in their slots (`ToSlots`, zeros elsewhere): [B, slots, h, w, classes].
    names: the two layers' (gather, scatter)."""
    found_rois, found_images, found_valid, found_slots = PositiveRois(
        slots, name=names[0])([rois, valid])
    found_logits = mask_head(found_rois, feature_maps, meta, roi_valid=found_valid,
                             image_indices=found_images, **head)
    return ToSlots(slots, name=names[1])([found_logits, found_slots, valid])


def _replicas() -> float:
    """Replicas of the strategy in scope: gradients are summed over them."""
    return float(tf.distribute.get_strategy().num_replicas_in_sync)


class MaskRCNNTrainingModel(keras.Model):
    """The training graph plus its losses: `fit` trains it with no `loss=` argument.

    Reports the five weighted losses and `loss` (their sum plus the L2 term) as metrics; Keras
    prefixes them with `val_` on validation data.
    """

    def __init__(self, *args, loss_weights: dict[str, float], weight_decay: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = dict(loss_weights)
        self.weight_decay = float(weight_decay)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *LOSS_NAMES)}

    def compute_losses(self, inputs: dict, outputs: dict) -> dict[str, tf.Tensor]:
        """The five losses, each multiplied by its LOSS_WEIGHTS entry; computed in float32
        from half-precision predictions too (MIXED_PRECISION)."""
        outputs = {name: tf.cast(value, tf.float32) if value.dtype.is_floating else value
                   for name, value in outputs.items()}
        active = parse_image_meta(inputs["input_image_meta"])["active_class_ids"]
        positive_ids = outputs["target_class_ids"][:, : outputs["target_mask"].shape[1]]
        values = {
            "rpn_class_loss": losses.rpn_class_loss(
                inputs["input_rpn_match"], outputs["rpn_class_logits"]),
            "rpn_bbox_loss": losses.rpn_bbox_loss(
                inputs["input_rpn_bbox"], inputs["input_rpn_match"], outputs["rpn_bbox"]),
            "mrcnn_class_loss": losses.mrcnn_class_loss(
                outputs["target_class_ids"], outputs["mrcnn_class_logits"], active,
                outputs["roi_valid"]),
            "mrcnn_bbox_loss": losses.mrcnn_bbox_loss(
                outputs["target_bbox"], outputs["target_class_ids"], outputs["mrcnn_bbox"]),
            "mrcnn_mask_loss": losses.mrcnn_mask_loss(
                outputs["target_mask"], positive_ids, outputs["mrcnn_mask_logits"]),
        }
        return {name: value * self.loss_weights[name] for name, value in values.items()}

    def _task_losses(self, data, training: bool):
        """(the five weighted losses' sum, the five) on a batch, without the L2 term."""
        inputs = data[0] if isinstance(data, tuple) else data
        values = self.compute_losses(inputs, self(inputs, training=training))
        return tf.add_n(list(values.values())), values

    def _update_trackers(self, total, values) -> dict[str, tf.Tensor]:
        self.trackers["loss"].update_state(total)
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        # Gradients are summed across replicas: scale so the sum is the mean.
        # MIXED_PRECISION=float16: the loss-scaling optimizer's scale (others: unchanged);
        # its apply() unscales the gradients.
        scale = self.optimizer.scale_loss(tf.constant(1.0 / _replicas()))
        with tf.GradientTape() as tape:
            task_loss, values = self._task_losses(data, training=True)
            scaled = task_loss * scale
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        # The L2 term's gradient joins here, scaled as the loss was (see the function).
        gradients = losses.add_weight_decay_gradients(gradients, variables, self.weight_decay,
                                                      scale=scale)
        total = task_loss + losses.weight_decay_loss(variables, self.weight_decay)  # before
        self.optimizer.apply(gradients, variables)
        return self._update_trackers(total, values)

    def test_step(self, data):
        task_loss, values = self._task_losses(data, training=False)
        total = task_loss + losses.weight_decay_loss(self.trainable_weights, self.weight_decay)
        return self._update_trackers(total, values)

    @property
    def metrics(self):
        return list(self.trackers.values())
