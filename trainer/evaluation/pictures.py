"""Pictures of detections for the evaluation report: masks blended, boxes, labels.

Instances are matterport's arrays: rois int32 [N, (y1, x1, y2, x2)] in image pixels with
y2/x2 exclusive, class_ids int32 [N], masks bool [H, W, N], optional scores float [N].
"""

from __future__ import annotations

import colorsys
import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from trainer.io.atomic import write_atomic

MASK_ALPHA = 0.5
GOLDEN_RATIO_CONJUGATE = 0.618033988749895  # hue step that keeps consecutive classes apart


def class_color(class_id: int) -> tuple[int, int, int]:
    """A bright RGB colour, the same for a class in every picture."""
    hue = (int(class_id) * GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_instances(image: np.ndarray, instances: dict, class_names: list[str],
                   min_side: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] copy of `image` with each instance's mask blended in its class colour,
    its box outlined, and "name score" (or just the name, without scores) at its top left.

    min_side: a smaller image is first enlarged by a whole factor (pixels repeated) until its
    shorter side reaches it, so the labels stay readable on small images."""
    image = _check_image(image)
    rois = np.asarray(instances["rois"]).reshape(-1, 4)
    class_ids = np.asarray(instances["class_ids"]).reshape(-1)
    masks = np.asarray(instances["masks"], dtype=bool)
    scores = instances.get("scores")
    if masks.shape[:2] != image.shape[:2] or masks.shape[-1] != len(rois):
        raise ValueError(f"masks {masks.shape} do not fit image {image.shape} with "
                         f"{len(rois)} instances (expected [H, W, N])")
    factor = max(1, -(-min_side // max(min(image.shape[:2]), 1)))
    if factor > 1:
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
        masks = masks.repeat(factor, axis=0).repeat(factor, axis=1)
        rois = rois * factor

    blended = image.astype(np.float32)
    for i, class_id in enumerate(class_ids):
        color = np.array(class_color(class_id), dtype=np.float32)
        mask = masks[..., i]
        blended[mask] = (1.0 - MASK_ALPHA) * blended[mask] + MASK_ALPHA * color
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i, ((y1, x1, y2, x2), class_id) in enumerate(zip(rois, class_ids)):
        if y2 <= y1 or x2 <= x1:
            continue
        color = class_color(class_id)
        # PIL rectangles include their end corner; ours is exclusive.
        draw.rectangle([int(x1), int(y1), int(x2) - 1, int(y2) - 1], outline=color)
        name = class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id)
        label = name if scores is None else f"{name} {float(scores[i]):.2f}"
        draw.text((int(x1) + 2, int(y1) + 1), label, fill=color, font=font)
    return np.asarray(picture)


def draw_predictions(image: np.ndarray, detection: dict, class_names: list[str],
                     ground_truth: dict | None = None, min_side: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] picture of a detection; with `ground_truth` (rois, class_ids, masks),
    [H, 2W, 3]: predictions on the left, ground truth on the right (see draw_instances for
    `min_side`)."""
    predicted = draw_instances(image, detection, class_names, min_side)
    if ground_truth is None:
        return predicted
    truth = {key: ground_truth[key] for key in ("rois", "class_ids", "masks")}
    return np.concatenate([predicted, draw_instances(image, truth, class_names, min_side)],
                          axis=1)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 [H, W, 3] (or [H, W]) array as PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return image
