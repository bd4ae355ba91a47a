"""Export for serving: a TensorFlow SavedModel whose `serving_default` signature takes encoded
images and returns detections in image pixels, with no Python of ours needed to run it.

    export_saved_model(config, "runs/demo.../mask_rcnn_demo_0003.h5", "export/demo")
    loaded = tf.saved_model.load("export/demo")
    out = loaded.signatures["serving_default"](images=tf.constant([png_bytes, jpeg_bytes]))

Signature `serving_default`:
    images            string [N]: encoded JPEG or PNG (any size; grayscale and RGBA become RGB)
returns (D = DETECTION_MAX_INSTANCES; rows past num_detections are zeros):
    num_detections    int32 [N]
    boxes             float32 [N, D, (y1, x1, y2, x2)] pixels of the original image, y2/x2
                      exclusive (matterport's `rois`)
    class_ids         int32 [N, D], 1..NUM_CLASSES-1
    class_names       string [N, D]
    scores            float32 [N, D]
    masks             float32 [N, D, h, w] (h, w = MASK_SHAPE) probabilities of the detection's
                      class inside its box: resize a mask to the box (bilinear) and threshold
                      at 0.5 for the full-size mask `MaskRCNN.detect()` returns.
Per-detection masks keep the response small (a full-size mask per detection would be
N x D x H x W); pasting them is the client's last step, as in matterport's `unmold_mask`.

Every image is molded to one shape, so the export needs IMAGE_RESIZE_MODE "square" (the
default; matterport's COCO and shapes configs use it).
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from trainer.config import Config
from trainer.data.transforms import inference_inputs
from trainer.engine.maskrcnn import MaskRCNN
from trainer.errors import UserError
from trainer.io.atomic import replace_dir, restore_replaced
from trainer.model.image_meta import parse_image_meta

SIGNATURE = "serving_default"


def serving_function(keras_model: keras.Model, config: Config, class_names: list[str]):
    """The tf.function behind the signature (see the module docstring)."""
    names = tf.constant(list(class_names), tf.string)
    channels = config.IMAGE_CHANNEL_COUNT
    molded_shape = [int(v) for v in config.IMAGE_SHAPE[:2]] + [channels]

    def mold(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        inputs = inference_inputs(tf.ensure_shape(image, [None, None, channels]), config)
        return tf.ensure_shape(inputs["input_image"], molded_shape), inputs["input_image_meta"]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        molded, metas = tf.map_fn(
            mold, images, fn_output_signature=(
                tf.TensorSpec(molded_shape, tf.float32),
                tf.TensorSpec([config.IMAGE_META_SIZE], tf.float32)))
        detections, _, _, mask_probs, *_ = keras_model([molded, metas], training=False)
        return unmold_batch(detections, mask_probs, metas, names)

    return serve


def unmold_batch(detections: tf.Tensor, mask_probs: tf.Tensor, metas: tf.Tensor,
                 class_names: tf.Tensor) -> dict[str, tf.Tensor]:
    """The model's outputs -> detections in original image pixels, in TensorFlow ops.

    detections [N, D, (y1, x1, y2, x2, class_id, score)] normalised to the molded image;
    mask_probs [N, D, h, w, C]; metas [N, META]. The same arithmetic as
    `trainer.engine.inference.unmold_detections`, batched and padded instead of trimmed.
    """
    fields = parse_image_meta(metas)
    h, w = fields["image_shape"][:, 0], fields["image_shape"][:, 1]
    oh, ow = fields["original_image_shape"][:, 0], fields["original_image_shape"][:, 1]
    wy1, wx1, wy2, wx2 = tf.unstack(fields["window"], axis=-1)
    scale = tf.stack([h - 1, w - 1, h - 1, w - 1], axis=-1)[:, None, :]
    boxes = detections[..., :4] * scale + tf.constant([0.0, 0.0, 1.0, 1.0])
    offset = tf.stack([wy1, wx1, wy1, wx1], axis=-1)[:, None, :]
    ratio_y, ratio_x = (wy2 - wy1) / oh, (wx2 - wx1) / ow
    ratio = tf.stack([ratio_y, ratio_x, ratio_y, ratio_x], axis=-1)[:, None, :]
    limit = tf.stack([oh, ow, oh, ow], axis=-1)[:, None, :]
    boxes = tf.clip_by_value(tf.round((boxes - offset) / ratio), 0.0, limit)

    class_ids = tf.cast(detections[..., 4], tf.int32)
    valid = (class_ids > 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    # Valid rows first, in the model's (score) order: a stable sort on "is padding".
    order = tf.argsort(tf.cast(~valid, tf.int32), axis=-1, stable=True)
    valid = tf.gather(valid, order, batch_dims=1)
    keep = tf.cast(valid, tf.float32)
    class_ids = tf.gather(class_ids, order, batch_dims=1) * tf.cast(valid, tf.int32)
    masks = tf.gather(tf.transpose(mask_probs, [0, 1, 4, 2, 3]), order, batch_dims=1)
    masks = tf.gather(masks, class_ids, axis=2, batch_dims=2)
    return {
        "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=-1),
        "boxes": tf.gather(boxes, order, batch_dims=1) * keep[..., None],
        "class_ids": class_ids,
        "class_names": tf.where(valid, tf.gather(class_names, class_ids), ""),
        "scores": tf.gather(detections[..., 5], order, batch_dims=1) * keep,
        "masks": masks * keep[..., None, None],
    }


def export_saved_model(config: Config, weights: str | Path, out_dir: str | Path, *,
                       class_names: list[str] | None = None) -> Path:
    """Writes the SavedModel of `weights` to `out_dir` (replaced only when complete).

    class_names: NUM_CLASSES names, background first (default: "BG", "class_1", ...).
    """
    if config.IMAGE_RESIZE_MODE != "square":
        raise UserError(f"export needs IMAGE_RESIZE_MODE=square (one input shape for a batch), "
                        f"got {config.IMAGE_RESIZE_MODE!r}: export with --set "
                        "IMAGE_RESIZE_MODE=square")
    names = list(class_names) if class_names else \
        ["BG"] + [f"class_{i}" for i in range(1, config.NUM_CLASSES)]
    if len(names) != config.NUM_CLASSES:
        raise UserError(f"{len(names)} class names for NUM_CLASSES={config.NUM_CLASSES}: give "
                        "one name per class, background first")
    out = Path(out_dir).absolute()
    restore_replaced(out)  # an earlier export killed mid-swap: its previous model comes back
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "saved_model.pb").is_file())):
        raise UserError(f"--out {out} exists and is not a SavedModel folder: choose a new one")
    if not Path(weights).is_file():
        raise UserError(f"weights file {weights} does not exist")
    model = MaskRCNN("inference", config.replace(GPU_COUNT=1))
    model.load_weights(weights, by_name=True)
    module = tf.Module()
    module.keras_model = model.keras_model
    module.serve = serving_function(model.keras_model, model.config, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{secrets.token_hex(4)}"
    try:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: module.serve})
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
