"""From images to matterport-style detections: mold inputs, run the model, unmold outputs."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import TypeVar

import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.data.transforms import inference_inputs, resize_geometry
from trainer.errors import UserError

Item = TypeVar("Item")


def molded_shape(image_shape: Sequence[int], config: Config) -> tuple[int, int]:
    """(height, width) of an image of `image_shape` once molded: one shape for every image in
    'square' mode; in 'pad64'/'none' mode it depends on the image's own size."""
    if config.IMAGE_RESIZE_MODE == "square":
        return int(config.IMAGE_SHAPE[0]), int(config.IMAGE_SHAPE[1])
    shape = resize_geometry(int(image_shape[0]), int(image_shape[1]), config)["shape"]
    return int(shape[0]), int(shape[1])


def batches_by_shape(items: Iterable[Item], shape_of: Callable[[Item], Hashable],
                     batch_size: int) -> Iterator[list[Item]]:
    """Groups `items` into lists of at most `batch_size` that share `shape_of(item)` (only
    images molded to one shape batch together), each list in input order. A list is yielded as
    soon as it is full; the partial ones follow at the end."""
    pending: dict[Hashable, list[Item]] = {}
    for item in items:
        group = pending.setdefault(shape_of(item), [])
        group.append(item)
        if len(group) == batch_size:
            yield pending.pop(shape_of(item))
    yield from pending.values()


def mold_inputs(images: Sequence[np.ndarray], config: Config) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [H, W, C] (any sizes) -> (molded images [N, h, w, C], metas [N, META]).

    Every image is resized and padded per IMAGE_RESIZE_MODE; in 'square' mode they share one
    shape, in 'pad64'/'none' mode only images of equal size can be batched together.
    """
    molded, metas = [], []
    for image in images:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != config.IMAGE_CHANNEL_COUNT:
            raise UserError(
                f"expected images of shape [H, W, {config.IMAGE_CHANNEL_COUNT}], got {image.shape}"
            )
        inputs = inference_inputs(tf.constant(image, tf.uint8), config)
        molded.append(inputs["input_image"].numpy())
        metas.append(inputs["input_image_meta"].numpy())
    return np.stack(molded), np.stack(metas)


@lru_cache(maxsize=256)
def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of tf.image.resize's bilinear resize along one axis (half-pixel
    centres, no antialias, up or down): output pixel i samples the input at
    (i + 0.5) * in_size / out_size - 0.5 from its two neighbours, clamped to the edge pixels.
    Resizing is separable, so a [h0, w0] map resizes to [h, w] as Wy @ map @ Wx.T; cached since
    a model's masks share one size and boxes repeat sizes. Read-only: callers share it."""
    # In float32 as TF's kernel: in float64 the sample points move by up to ~2e-5 px at 300 px.
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    below = np.floor(source)
    fraction = source - below
    rows = np.arange(out_size)
    weights = np.zeros((out_size, in_size), np.float32)  # float32 matmuls: twice float64's speed
    weights[rows, np.clip(below, 0, in_size - 1).astype(np.intp)] = 1 - fraction
    # +=: outside the input's first and last centres both neighbours clamp to the edge pixel.
    weights[rows, np.clip(below + 1, 0, in_size - 1).astype(np.intp)] += fraction
    weights.flags.writeable = False
    return weights


def _resize_bilinear(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h0, w0] map -> [height, width] (float32 for a float32 map), as tf.image.resize(mask[...,
    None], (height, width), method="bilinear")[..., 0] to float rounding, in numpy: no TF op per
    mask."""
    return (_bilinear_weights(mask.shape[0], height) @ mask
            @ _bilinear_weights(mask.shape[1], width).T)


def unmold_mask(mask: np.ndarray, box: np.ndarray, image_shape: tuple[int, int],
                threshold: float = 0.5) -> np.ndarray:
    """A [h, w] mask probability map of `box` (y1, x1, y2, x2 pixels, exclusive ends) -> bool
    full-image mask [H, W]."""
    full = np.zeros(image_shape[:2], dtype=bool)
    _paste_mask(full, mask, box, threshold)
    return full


def _paste_mask(full: np.ndarray, mask: np.ndarray, box, threshold: float) -> None:
    """Writes `mask` resized to `box` and thresholded into the bool [H, W] array `full` (a view
    is fine); an empty box writes nothing."""
    y1, x1, y2, x2 = (int(v) for v in box)
    if y2 > y1 and x2 > x1:
        full[y1:y2, x1:x2] = _resize_bilinear(mask, y2 - y1, x2 - x1) >= threshold


def unmold_detections(detections: np.ndarray, mrcnn_mask: np.ndarray, original_shape,
                      image_shape, window) -> dict[str, np.ndarray]:
    """One image's model outputs -> matterport's result dict in original image coordinates.

    detections [N, (y1, x1, y2, x2, class_id, score)] normalised to the molded image (zero rows
    are padding); mrcnn_mask [N, h, w, num_classes] probabilities; window (y1, x1, y2, x2): the
    real image inside the molded one, pixels. Returns rois int32 [n, 4] (exclusive ends),
    class_ids int32 [n], scores float32 [n], masks bool [H, W, n].
    """
    count = int(np.sum(detections[:, 4] > 0))
    boxes = detections[:count, :4]
    class_ids = detections[:count, 4].astype(np.int32)
    scores = detections[:count, 5].astype(np.float32)
    masks = mrcnn_mask[np.arange(count), :, :, class_ids]

    # Normalised -> molded pixels (the inverse of norm_boxes: y2/x2 come back exclusive) ->
    # minus the padding, over the resize ratio -> original pixels. Box edges scale by
    # resized/original size, as the resized gt masks that the model learned from; matterport's
    # corner-aligned (oh - 1) / (h - 1) instead stretches boxes, 5 px at 640 px scaled 6x down.
    h, w = float(image_shape[0]), float(image_shape[1])
    boxes = boxes.astype(np.float64) * [h - 1, w - 1, h - 1, w - 1] + [0, 0, 1, 1]
    wy1, wx1, wy2, wx2 = np.asarray(window, np.float64)
    oh, ow = int(original_shape[0]), int(original_shape[1])
    ratio_y, ratio_x = (wy2 - wy1) / oh, (wx2 - wx1) / ow
    boxes = (boxes - [wy1, wx1, wy1, wx1]) / [ratio_y, ratio_x, ratio_y, ratio_x]
    boxes = np.clip(np.round(boxes).astype(np.int32), 0, [oh, ow, oh, ow])

    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, class_ids, scores, masks = boxes[keep], class_ids[keep], scores[keep], masks[keep]
    # Pasted into one array: stacking a full-image mask per detection cost more than all the
    # resizes.
    full_masks = np.zeros((oh, ow, len(boxes)), dtype=bool)
    for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        _paste_mask(full_masks[..., i], mask, box, threshold=0.5)
    return {"rois": boxes, "class_ids": class_ids, "scores": scores, "masks": full_masks}
