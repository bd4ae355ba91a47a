"""The record every reader produces: one image with its objects, whatever the source."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AnnotatedImage:
    """One readable image with its objects, source-independent (COCO and shapes produce it).

    image_encoded: the file's bytes, PNG or JPEG (`image_format` "png" / "jpeg")
    masks: bool [H, W, N]
    boxes: float64 [N, (y1, x1, y2, x2)] in pixels, y2/x2 exclusive
    class_ids: int32 [N], contiguous 1..num_classes-1
    is_crowd: bool [N]
    """

    image_encoded: bytes
    image_format: str
    height: int
    width: int
    filename: str
    image_id: int
    masks: np.ndarray
    boxes: np.ndarray
    class_ids: np.ndarray
    is_crowd: np.ndarray
    sha256: str = field(default="")

    @property
    def source_id(self) -> str:
        return str(self.image_id)
