"""From one decoded example to the model's fixed-size inputs, in TensorFlow (runs in tf.data).

resize (IMAGE_RESIZE_MODE, as matterport's `resize_image`) -> masks resized alike -> boxes
from masks -> at most MAX_GT_INSTANCES -> mini-masks -> RPN targets -> image meta -> padding.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.config import Config
from trainer.model.image_meta import compose_image_meta
from trainer.model.targets import rpn_targets


def _scale_for(height: tf.Tensor, width: tf.Tensor, config: Config) -> tf.Tensor:
    """Matterport's scale: up to IMAGE_MIN_DIM on the short side (never down), at least
    IMAGE_MIN_SCALE, and in 'square' mode the long side capped at IMAGE_MAX_DIM."""
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    scale = tf.constant(1.0)
    if config.IMAGE_MIN_DIM and config.IMAGE_RESIZE_MODE != "none":
        scale = tf.maximum(1.0, config.IMAGE_MIN_DIM / tf.minimum(h, w))
    if config.IMAGE_MIN_SCALE and config.IMAGE_RESIZE_MODE != "none":
        scale = tf.maximum(scale, config.IMAGE_MIN_SCALE)
    if config.IMAGE_RESIZE_MODE == "square":
        long_side = tf.maximum(h, w)
        scale = tf.where(tf.round(long_side * scale) > config.IMAGE_MAX_DIM,
                         config.IMAGE_MAX_DIM / long_side, scale)
    return scale


def resize_geometry(height, width, config: Config) -> dict:
    """Where an image of (height, width) lands in the model's input.

    Returns scale, resized (h, w), padding (top, bottom, left, right), crop offset (y, x) and
    crop_shape (the whole resized image unless 'crop' mode), output shape (out_h, out_w), and
    window (y1, x1, y2, x2): the real
    image inside the padding, in output pixels. All int32 except scale.
    """
    scale = _scale_for(height, width, config)
    new_h = tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32)
    zero = tf.constant(0, tf.int32)
    crop = tf.stack([zero, zero])
    mode = config.IMAGE_RESIZE_MODE
    if mode == "square":
        side = config.IMAGE_MAX_DIM
        top, left = (side - new_h) // 2, (side - new_w) // 2
        padding = tf.stack([top, side - new_h - top, left, side - new_w - left])
    elif mode == "pad64":
        out_h, out_w = -(-new_h // 64) * 64, -(-new_w // 64) * 64
        top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
        padding = tf.stack([top, out_h - new_h - top, left, out_w - new_w - left])
    elif mode == "crop":
        side = config.IMAGE_MIN_DIM
        room = tf.cast(tf.stack([new_h - side + 1, new_w - side + 1]), tf.float32)
        crop = tf.cast(tf.random.uniform([2]) * room, tf.int32)  # a random crop offset
        padding = tf.stack([zero, zero, zero, zero])
    else:  # none
        padding = tf.stack([zero, zero, zero, zero])
    if mode == "crop":
        out_h = out_w = tf.constant(config.IMAGE_MIN_DIM)
        window = tf.stack([zero, zero, out_h, out_w])
    else:
        out_h = new_h + padding[0] + padding[1]
        out_w = new_w + padding[2] + padding[3]
        window = tf.stack([padding[0], padding[2], padding[0] + new_h, padding[2] + new_w])
    resized = tf.stack([new_h, new_w])
    return {"scale": scale, "resized": resized, "padding": padding, "crop": crop,
            "crop_shape": tf.stack([out_h, out_w]) if mode == "crop" else resized,
            "shape": tf.stack([out_h, out_w]), "window": window}


def apply_geometry(image: tf.Tensor, geometry: dict, method: str = "bilinear") -> tf.Tensor:
    """Resizes, then crops or pads `image` [H, W, C] per `geometry` (see `resize_geometry`)."""
    dtype = image.dtype
    resized = tf.image.resize(image, geometry["resized"], method=method)
    if method != "nearest":
        resized = tf.clip_by_value(tf.round(resized), 0, 255) if dtype == tf.uint8 else resized
    resized = tf.cast(resized, dtype)
    (y, x), (h, w) = tf.unstack(geometry["crop"]), tf.unstack(geometry["crop_shape"])
    padding = geometry["padding"]
    return tf.pad(resized[y: y + h, x: x + w], [padding[:2], padding[2:], [0, 0]])


def boxes_from_masks(masks: tf.Tensor) -> tf.Tensor:
    """bool [H, W, N] -> int32 [N, (y1, x1, y2, x2)], y2/x2 exclusive; zeros for empty masks."""
    rows = tf.reduce_any(masks, axis=1)  # [H, N]
    cols = tf.reduce_any(masks, axis=0)  # [W, N]

    def span(hits):
        size = tf.shape(hits)[0]
        index = tf.range(size)[:, None]
        first = tf.reduce_min(tf.where(hits, index, size), axis=0)
        last = tf.reduce_max(tf.where(hits, index, -1), axis=0) + 1
        present = tf.reduce_any(hits, axis=0)
        return tf.where(present, first, 0), tf.where(present, last, 0)

    y1, y2 = span(rows)
    x1, x2 = span(cols)
    return tf.stack([y1, x1, y2, x2], axis=1)


def mini_masks(masks: tf.Tensor, boxes: tf.Tensor, shape) -> tf.Tensor:
    """Each mask's box, resized to `shape`: bool [H, W, N] + int32 boxes [N, 4] ->
    bool [h, w, N] (matterport's `minimize_mask`)."""
    size = tf.cast(tf.shape(masks)[:2], tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    # crop_and_resize samples at pixel centres of the box edges: (y2 - 1) is the last row.
    normalized = tf.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - 1.0, boxes[:, 3] - 1.0],
                          axis=1) / tf.concat([size - 1.0, size - 1.0], axis=0)
    images = tf.transpose(tf.cast(masks, tf.float32), [2, 0, 1])[..., None]  # [N, H, W, 1]
    crops = tf.image.crop_and_resize(images, normalized, tf.range(tf.shape(boxes)[0]), shape)
    return tf.transpose(crops[..., 0] >= 0.5, [1, 2, 0])


def pad_instances(values: tf.Tensor, count: int, axis: int = 0) -> tf.Tensor:
    """Pads (with zeros/False) or truncates `values` along `axis` to exactly `count`."""
    values = tf.gather(values, tf.range(tf.minimum(tf.shape(values)[axis], count)), axis=axis)
    pad = [[0, 0]] * values.shape.rank
    pad[axis] = [0, count - tf.shape(values)[axis]]
    return tf.pad(values, pad)


def mold_image(image: tf.Tensor, config: Config) -> tf.Tensor:
    """uint8 or float [..., C] -> float32 minus MEAN_PIXEL (the network's input)."""
    return tf.cast(image, tf.float32) - tf.constant(config.MEAN_PIXEL, tf.float32)


def inference_inputs(image: tf.Tensor, config: Config, image_id=0) -> dict:
    """uint8 [H, W, C] -> {input_image, input_image_meta, window} for the inference model."""
    geometry = resize_geometry(tf.shape(image)[0], tf.shape(image)[1], config)
    resized = apply_geometry(image, geometry)
    meta = compose_image_meta(image_id, tf.shape(image), tf.shape(resized), geometry["window"],
                              geometry["scale"], tf.ones([config.NUM_CLASSES]))
    return {"input_image": mold_image(resized, config), "input_image_meta": meta}


def training_example(image: tf.Tensor, masks: tf.Tensor, class_ids: tf.Tensor, config: Config,
                     anchors: tf.Tensor, image_id=0, active_class_ids=None,
                     augment=None) -> dict:
    """One example's model inputs (unbatched), fixed-size when the resize mode allows.

    image uint8 [H, W, C]; masks bool [H, W, N]; class_ids int32 [N] (crowd regions < 0);
    anchors float32 [A, 4] pixels for the output image size (see `anchors_for_image`);
    augment: optional fn (image, masks) -> (image, masks) run on the resized pair.
    """
    original_shape = tf.shape(image)
    geometry = resize_geometry(original_shape[0], original_shape[1], config)
    image = apply_geometry(image, geometry)
    masks = apply_geometry(tf.cast(masks, tf.uint8), geometry, method="nearest") > 0
    if augment is not None:
        image, masks = augment(image, masks)
    boxes = boxes_from_masks(masks)
    # Instances cropped or resized out of sight have no box left: drop them.
    keep = tf.where(boxes[:, 2] > boxes[:, 0])[:, 0]
    class_ids = tf.cast(class_ids, tf.int32)
    # The RPN learns from every object (matterport's order); the heads' ground truth is a
    # random MAX_GT_INSTANCES of them.
    rpn_match, rpn_bbox = rpn_targets(anchors, tf.gather(class_ids, keep),
                                      tf.cast(tf.gather(boxes, keep), tf.float32),
                                      config.RPN_TRAIN_ANCHORS_PER_IMAGE,
                                      config.RPN_BBOX_STD_DEV)
    keep = tf.random.shuffle(keep)[: config.MAX_GT_INSTANCES]
    boxes = tf.gather(boxes, keep)
    class_ids = tf.gather(class_ids, keep)
    masks = tf.gather(masks, keep, axis=2)
    if config.USE_MINI_MASK:
        masks = mini_masks(masks, boxes, config.MINI_MASK_SHAPE)
    if active_class_ids is None:
        active_class_ids = tf.ones([config.NUM_CLASSES])
    meta = compose_image_meta(image_id, original_shape, tf.shape(image), geometry["window"],
                              geometry["scale"], active_class_ids)
    max_gt = config.MAX_GT_INSTANCES
    return {
        "input_image": mold_image(image, config),
        "input_image_meta": meta,
        "input_rpn_match": rpn_match,
        "input_rpn_bbox": rpn_bbox,
        "input_gt_class_ids": pad_instances(class_ids, max_gt),
        "input_gt_boxes": tf.cast(pad_instances(boxes, max_gt), tf.float32),
        "input_gt_masks": tf.cast(pad_instances(masks, max_gt, axis=2), tf.uint8),
    }


def has_objects(inputs: dict) -> tf.Tensor:
    """Whether a training example (see `training_example`) keeps at least one non-crowd
    object. Matterport skips the others: resizing, cropping or augmentation may have removed
    every object, and an image with nothing to find teaches the heads nothing."""
    return tf.reduce_any(inputs["input_gt_class_ids"] > 0)
