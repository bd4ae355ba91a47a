"""Writing COCO json (the val split's ground truth): an image's objects as COCO annotations,
and a writer that streams images and annotations to one file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from trainer.data.records import AnnotatedImage


def coco_annotations(image: AnnotatedImage) -> list[dict]:
    """The image's objects as COCO annotations without ids: masks as compressed RLE, boxes
    as [x, y, w, h] and areas in mask pixels, all in the image's own coordinates."""
    annotations = []
    for i in range(image.masks.shape[-1]):
        mask = np.asfortranarray(image.masks[:, :, i].astype(np.uint8))
        rle = mask_utils.encode(mask)
        y1, x1, y2, x2 = (float(v) for v in image.boxes[i])
        annotations.append({
            "image_id": image.image_id,
            "category_id": int(image.class_ids[i]),
            "segmentation": {"size": [image.height, image.width],
                             "counts": rle["counts"].decode()},
            "area": float(mask_utils.area(rle)),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "iscrowd": int(image.is_crowd[i]),
        })
    return annotations


class CocoJsonWriter:
    """Writes a COCO json one image at a time; memory stays flat as the dataset grows.

    Images and annotations go to two temporary files beside `path`, joined on `close`;
    annotation ids are assigned here, 1, 2, ... in order.
    """

    def __init__(self, path: Path, categories: list[dict]) -> None:
        self.path, self.categories = path, categories
        self._parts = [path.parent / f".{path.name}.{part}" for part in ("images", "anns")]
        self._files = [part.open("w") for part in self._parts]
        self.images = self.annotations = 0

    def add(self, image: dict, annotations: list[dict]) -> None:
        images, anns = self._files
        images.write(("," if self.images else "") + json.dumps(image, separators=(",", ":")))
        self.images += 1
        for ann in annotations:
            self.annotations += 1
            ann = {"id": self.annotations, **ann}
            prefix = "," if self.annotations > 1 else ""
            anns.write(prefix + json.dumps(ann, separators=(",", ":")))

    def close(self) -> None:
        for file in self._files:
            file.close()
        images, anns = self._parts
        with self.path.open("w") as out:
            out.write('{"info":{"description":"written by mrcnn data prepare"},"categories":')
            out.write(json.dumps(self.categories) + ',"images":[')
            with images.open() as part:
                shutil.copyfileobj(part, out)
            out.write('],"annotations":[')
            with anns.open() as part:
                shutil.copyfileobj(part, out)
            out.write("]}\n")
        for part in self._parts:
            part.unlink()
