"""Synthetic shapes: squares, circles and triangles on plain random backgrounds.

The embedded default dataset (as matterport's shapes example): every image is a pure function
of its seed, so a dataset of any size is reproducible without storing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("BG", "square", "circle", "triangle")

# An instance left with fewer visible pixels than this, after later shapes covered it, is
# dropped: its box would be meaningless.
MIN_VISIBLE_PIXELS = 16


@dataclass(frozen=True)
class ShapesSample:
    """One generated image with its instances.

    image: uint8 [H, W, 3]
    masks: bool [H, W, N], one channel per instance, occlusion applied
    boxes: int32 [N, (y1, x1, y2, x2)] pixel box of each mask, y2/x2 exclusive
    class_ids: int32 [N] in 1..3 (index into CLASS_NAMES)
    """

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    class_ids: np.ndarray


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight boxes around masks. masks: bool [H, W, N] -> int32 [N, (y1, x1, y2, x2)].

    y2/x2 are exclusive; an empty mask gives an all-zero box.
    """
    boxes = np.zeros((masks.shape[-1], 4), dtype=np.int32)
    for i in range(masks.shape[-1]):
        rows = np.flatnonzero(masks[:, :, i].any(axis=1))
        cols = np.flatnonzero(masks[:, :, i].any(axis=0))
        if rows.size:
            boxes[i] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return boxes


def _shape_polygon_mask(kind: str, cy: int, cx: int, size: int, height: int, width: int):
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "square":
        draw.rectangle([cx - size, cy - size, cx + size, cy + size], fill=1)
    elif kind == "circle":
        draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=1)
    else:  # triangle: equilateral, pointing up, centred on (cy, cx)
        half_base = size / np.sin(np.pi / 3)
        draw.polygon(
            [(cx, cy - size), (cx - half_base, cy + size), (cx + half_base, cy + size)], fill=1
        )
    return np.asarray(canvas, dtype=bool)


def generate_sample(
    seed: int,
    height: int = 128,
    width: int = 128,
    min_instances: int = 1,
    max_instances: int = 4,
) -> ShapesSample:
    """Generates the image of `seed`: 1..max_instances shapes of random class, colour and size.

    Shapes are kept well inside the image (a margin of their size) and later shapes occlude
    earlier ones; instances left nearly invisible are dropped.
    """
    if min_instances < 0 or max_instances < min_instances:
        raise ValueError(
            f"need 0 <= min_instances <= max_instances, got {min_instances}, {max_instances}"
        )
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, size=3)
    image = np.broadcast_to(background, (height, width, 3)).astype(np.uint8).copy()
    count = int(rng.integers(min_instances, max_instances + 1))

    masks, class_ids = [], []
    smaller = min(height, width)
    for _ in range(count):
        class_id = int(rng.integers(1, len(CLASS_NAMES)))
        size = int(rng.integers(max(smaller // 16, 3), max(smaller // 5, 4) + 1))
        cy = int(rng.integers(size, height - size))
        cx = int(rng.integers(size, width - size))
        # A colour far enough from the background to be learnable.
        color = (background + rng.integers(60, 196, size=3)) % 256
        mask = _shape_polygon_mask(CLASS_NAMES[class_id], cy, cx, size, height, width)
        image[mask] = color
        for earlier in masks:
            earlier &= ~mask
        masks.append(mask)
        class_ids.append(class_id)

    keep = [i for i, m in enumerate(masks) if m.sum() >= MIN_VISIBLE_PIXELS]
    stacked = (
        np.stack([masks[i] for i in keep], axis=-1)
        if keep
        else np.zeros((height, width, 0), dtype=bool)
    )
    return ShapesSample(
        image=image,
        masks=stacked,
        boxes=boxes_from_masks(stacked),
        class_ids=np.asarray([class_ids[i] for i in keep], dtype=np.int32),
    )


def generate(
    count: int, seed: int = 0, height: int = 128, width: int = 128, **kwargs
) -> Iterator[ShapesSample]:
    """Yields `count` samples; sample i is `generate_sample(seed * 1_000_003 + i, ...)`."""
    for i in range(count):
        yield generate_sample(seed * 1_000_003 + i, height, width, **kwargs)
