"""A tiny COCO dataset built for each test: PIL-written images and an instances JSON that
exercises polygons (one and two parts), compressed and uncompressed RLE, and a crowd region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

HEIGHT, WIDTH = 48, 64
# Non-contiguous COCO ids on purpose: they must map to 1..3 in id order, names kept.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]


def write_image(path: Path, height: int = HEIGHT, width: int = WIDTH, seed: int = 0,
                fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros, as COCO's crowd regions."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def box_of(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]),
            float(rows[-1] + 1 - rows[0])]


def rect_mask(y1: int, x1: int, y2: int, x2: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def tiny_coco_dict() -> dict:
    disk = np.zeros((HEIGHT, WIDTH), dtype=bool)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    disk[(yy - 24) ** 2 + (xx - 40) ** 2 <= 81] = True
    crowd = rect_mask(2, 2, 20, 30)
    blob = rect_mask(30, 5, 45, 25)
    images = [
        {"id": 10, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
        {"id": 20, "file_name": "sub/b.jpg", "height": HEIGHT, "width": WIDTH},
        {"id": 30, "file_name": "c.png", "height": HEIGHT, "width": WIDTH},
    ]
    annotations = [
        # A triangle polygon, and a two-part polygon (one object in two pieces).
        {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 300.0,
         "segmentation": [[5.0, 5.0, 30.0, 5.0, 5.0, 30.0]], "bbox": [5.0, 5.0, 25.0, 25.0]},
        {"id": 2, "image_id": 10, "category_id": 7, "iscrowd": 0, "area": 200.0,
         "segmentation": [[40, 30, 60, 30, 60, 44, 40, 44], [35, 2, 45, 2, 45, 12]],
         "bbox": [35.0, 2.0, 25.0, 42.0]},
        # Compressed RLE, and a crowd region in uncompressed RLE.
        {"id": 3, "image_id": 20, "category_id": 11, "iscrowd": 0, "area": float(disk.sum()),
         "segmentation": compressed_rle(disk), "bbox": box_of(disk)},
        {"id": 4, "image_id": 20, "category_id": 3, "iscrowd": 1, "area": float(crowd.sum()),
         "segmentation": uncompressed_rle(crowd), "bbox": box_of(crowd)},
        # Uncompressed RLE on a non-crowd object.
        {"id": 5, "image_id": 30, "category_id": 7, "iscrowd": 0, "area": float(blob.sum()),
         "segmentation": uncompressed_rle(blob), "bbox": box_of(blob)},
    ]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def write_coco(root: Path, data: dict) -> tuple[Path, Path]:
    """Writes data's images (random pixels; JPEG for .jpg names) and the JSON under root."""
    images_dir = root / "images"
    for i, entry in enumerate(data["images"]):
        fmt = "JPEG" if entry["file_name"].endswith(".jpg") else "PNG"
        write_image(images_dir / entry["file_name"], entry["height"], entry["width"], i, fmt)
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(data))
    return annotations, images_dir


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    """(instances JSON path, images folder) of `tiny_coco_dict()`."""
    return write_coco(tmp_path / "coco", tiny_coco_dict())
