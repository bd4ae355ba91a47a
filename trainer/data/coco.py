"""COCO-format datasets: an instances JSON plus an images folder, local or `gs://bucket/prefix`.

`CocoSource` loads the JSON once (category map, annotations grouped by image) and yields one
small `CocoTask` per image; `read_task` turns a task into an `AnnotatedImage` in a worker
process: it reads the image, checks it, and decodes every object's mask with pycocotools
(polygons, compressed and uncompressed RLE, crowd regions).

Bad records never raise: each is skipped (or repaired) and reported as an `Issue` whose
`reason` is one of the codes below, so that prepare can record it in dataset.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from trainer.data.records import AnnotatedImage
from trainer.errors import StorageError, UserError
from trainer.io import storage

# Reason codes of skipped or repaired records.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
SIZE_MISMATCH = "size_mismatch"
PATH_ESCAPES = "path_escapes_images_dir"
BAD_IMAGE_ENTRY = "bad_image_entry"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
UNKNOWN_IMAGE_ID = "unknown_image_id"
NO_OBJECTS = "no_objects"
POLYGON_TOO_FEW_POINTS = "polygon_too_few_points"
BAD_SEGMENTATION = "bad_segmentation"
BOX_OUTSIDE_IMAGE = "box_outside_image"
BOX_CLIPPED = "box_clipped"
ZERO_AREA = "zero_area"
UNKNOWN_CATEGORY = "unknown_category"
COORDINATES_OUT_OF_RANGE = "coordinates_out_of_range"
UNREADABLE_RECORD = "unreadable_record"  # an error no check above foresaw
DECODER_CRASHED = "decoder_crashed"  # the process decoding it died (a native crash)

# How far outside the image a polygon may reach, in image sizes: annotation tools leave
# points outside (the object is then clipped or found outside the image); far beyond is
# garbage, and pycocotools' rasteriser walks every edge pixel by pixel (1e9 crashes it).
POLYGON_MARGIN = 4.0

SKIPPED, REPAIRED = "skipped", "repaired"


@dataclass(frozen=True)
class Issue:
    """One skipped or repaired record: an image (`annotation_id` None) or one of its objects."""

    record: str  # the image's file name (or id when it has none)
    reason: str  # one of the codes above
    detail: str  # what exactly was wrong, for a human
    action: str = SKIPPED  # SKIPPED or REPAIRED
    annotation_id: int | None = None

    def to_json(self) -> dict:
        entry = {"record": self.record, "reason": self.reason, "action": self.action}
        if self.annotation_id is not None:
            entry["annotation_id"] = self.annotation_id
        entry["detail"] = self.detail
        return entry


@dataclass(frozen=True)
class CocoContext:
    """What a worker needs besides the task: where images are, and the category map."""

    images_root: str
    contiguous_ids: dict[int, int]  # COCO category id -> 1..N, selected categories only
    known_category_ids: frozenset[int]  # every category id in the JSON


@dataclass(frozen=True)
class CocoTask:
    """One image entry of the JSON with its annotations (references into the loaded JSON)."""

    image: dict
    annotations: list[dict]


class CocoSource:
    """An instances JSON (local path or gs://) and its images folder.

    class_names: ("BG", name of contiguous id 1, ...): the JSON's categories ordered by their
    COCO id, or the subset named in `categories`.
    """

    def __init__(
        self, annotations: str, images: str, categories: Sequence[str] | None = None
    ) -> None:
        raw = storage.read_bytes(annotations)
        self.annotations_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            data = json.loads(raw)
            images_list, annotations_list = data["images"], data.get("annotations", [])
            category_list = sorted(data["categories"], key=lambda c: c["id"])
            names = {int(c["id"]): str(c["name"]) for c in category_list}
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"{annotations} is not a COCO instances JSON ({type(err).__name__}: {err}): "
                "it needs 'images', 'annotations' and 'categories' with ids and names"
            ) from err
        del raw
        selected = list(names)
        if categories:
            by_name = {name: cid for cid, name in names.items()}
            unknown = [name for name in categories if name not in by_name]
            if unknown:
                raise UserError(
                    f"unknown categories {unknown} in --categories: {annotations} has "
                    f"{sorted(by_name)}"
                )
            selected = sorted(by_name[name] for name in dict.fromkeys(categories))
        self.categories = [
            {"id": i, "name": names[cid], "coco_id": cid} for i, cid in enumerate(selected, 1)
        ]
        self.class_names = ("BG", *(c["name"] for c in self.categories))
        self.context = CocoContext(
            images_root=images.rstrip("/"),
            contiguous_ids={c["coco_id"]: c["id"] for c in self.categories},
            known_category_ids=frozenset(names),
        )
        self._images = images_list
        self._by_image: dict[object, list[dict]] = defaultdict(list)
        for ann in annotations_list:
            if isinstance(ann, dict):
                self._by_image[ann.get("image_id")].append(ann)

    def __len__(self) -> int:
        return len(self._images)

    def tasks(self, issues: list[Issue], limit: int | None = None) -> Iterator[CocoTask]:
        """One task per image entry, in JSON order, up to `limit`. Duplicate image ids, and
        annotations of image ids absent from the JSON, go to `issues`."""
        seen: set[object] = set()
        for index, image in enumerate(self._images):
            if limit is not None and index >= limit:
                break
            if not isinstance(image, dict):
                issues.append(Issue(f"images[{index}]", BAD_IMAGE_ENTRY, "not an object"))
                continue
            image_id = image.get("id")
            if image_id in seen:
                issues.append(Issue(record_name(image), DUPLICATE_IMAGE_ID,
                                    f"image id {image_id} repeats"))
                continue
            seen.add(image_id)
            yield CocoTask(image, self._by_image.get(image_id, []))
        if limit is None:
            for image_id, anns in self._by_image.items():
                if image_id not in seen:
                    issues.extend(
                        Issue(str(image_id), UNKNOWN_IMAGE_ID, "no image entry has this id",
                              annotation_id=ann.get("id"))
                        for ann in anns
                    )


# === Reading one image (runs in a worker) ===


def record_name(entry: dict) -> str:
    """How an image entry is named in reports: its file name, else its id."""
    return str(entry.get("file_name", entry.get("id")))


def read_task(context: CocoContext, task: CocoTask) -> tuple[AnnotatedImage | None, list[Issue]]:
    """Reads and checks one image and decodes its objects; None when the image is skipped."""
    entry = task.image
    name = record_name(entry)
    try:
        image_id, height, width = entry["id"], entry["height"], entry["width"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (image_id, height,
                                                                                width)):
            raise TypeError("id, height and width must be integers")
        if height <= 0 or width <= 0:
            raise ValueError(f"size {height}x{width} is not positive")
        file_name = entry["file_name"]
    except (KeyError, TypeError, ValueError) as err:
        return None, [Issue(name, BAD_IMAGE_ENTRY, f"{type(err).__name__}: {err}")]

    relative = posixpath.normpath(str(file_name).replace("\\", "/"))
    if relative.startswith("/") or relative == ".." or relative.startswith("../"):
        detail = f"{file_name!r} leaves the images folder {context.images_root}"
        return None, [Issue(name, PATH_ESCAPES, detail)]
    uri = f"{context.images_root}/{relative}"
    try:
        data = storage.read_bytes(uri)
    except StorageError as err:
        reason = MISSING_IMAGE if _is_missing(err) else UNREADABLE_IMAGE
        return None, [Issue(name, reason, str(err))]
    try:
        encoded, image_format, (file_width, file_height) = _checked_image_bytes(data)
    except Exception as err:  # PIL raises many kinds for a broken file
        return None, [Issue(name, UNREADABLE_IMAGE, f"{uri}: {type(err).__name__}: {err}")]
    if (file_height, file_width) != (height, width):
        detail = f"the JSON says {height}x{width} (HxW), the file is {file_height}x{file_width}"
        return None, [Issue(name, SIZE_MISMATCH, detail)]

    issues: list[Issue] = []
    masks, boxes, class_ids, crowd = [], [], [], []
    for ann in task.annotations:
        obj = _read_object(context, ann, height, width, name, issues)
        if obj is not None:
            masks.append(obj[0])
            boxes.append(obj[1])
            class_ids.append(obj[2])
            crowd.append(obj[3])
    if not any(not c for c in crowd):
        issues.append(Issue(name, NO_OBJECTS, "no usable non-crowd object in the selected "
                                              "categories"))
        return None, issues
    return AnnotatedImage(
        image_encoded=encoded,
        image_format=image_format,
        height=height,
        width=width,
        filename=relative,
        image_id=image_id,
        masks=np.stack(masks, axis=-1),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        class_ids=np.asarray(class_ids, dtype=np.int32),
        is_crowd=np.asarray(crowd, dtype=bool),
        sha256=hashlib.sha256(data).hexdigest(),
    ), issues


def _is_missing(err: BaseException) -> bool:
    """Whether a storage failure means "no such file or object" (not a permission or
    network problem), judged by the causes storage chained to it."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, FileNotFoundError) or type(cause).__name__ == "NotFound":
            return True
        cause = cause.__cause__
    return str(err).startswith("not found")


def _checked_image_bytes(data: bytes) -> tuple[bytes, str, tuple[int, int]]:
    """Fully decodes `data` (a truncated file fails here, not in training) and returns the
    bytes to store with their format and (width, height). PNG and JPEG in RGB or grey are
    stored as read; anything else is converted to an RGB PNG that TensorFlow decodes."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format in ("PNG", "JPEG") and image.mode in ("RGB", "L"):
            return data, image.format.lower(), image.size
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue(), "png", image.size


def _read_object(
    context: CocoContext, ann: dict, height: int, width: int, name: str, issues: list[Issue]
) -> tuple[np.ndarray, list[float], int, bool] | None:
    """(mask bool [H, W], box [y1, x1, y2, x2], contiguous class id, is_crowd) of one
    annotation, or None when it is skipped (reason appended to `issues`)."""
    ann_id = ann.get("id")

    def issue(reason: str, detail: str, action: str = SKIPPED) -> None:
        issues.append(Issue(name, reason, detail, action, ann_id))

    category = ann.get("category_id")
    if category not in context.known_category_ids:
        issue(UNKNOWN_CATEGORY, f"category_id {category!r} is not in the JSON's categories")
        return None
    if category not in context.contiguous_ids:
        return None  # not a selected category: filtered on purpose, not a bad record
    mask = _decode_segmentation(ann.get("segmentation"), height, width, issue)
    if mask is None:
        return None
    box = _checked_box(ann.get("bbox"), mask, height, width, issue)
    if box is None:
        return None
    if not mask.any():
        issue(ZERO_AREA, "the segmentation covers no pixel")
        return None
    return mask, box, context.contiguous_ids[category], bool(ann.get("iscrowd", 0))


def _decode_segmentation(segmentation, height: int, width: int, issue) -> np.ndarray | None:
    """A polygon list, an uncompressed RLE (counts list) or a compressed RLE (counts string)
    -> bool [H, W]. Polygons with fewer than 3 points are dropped (the object with them when
    none is left). Everything is checked before pycocotools sees it: polygon points within
    POLYGON_MARGIN image sizes of the image, RLE counts non-negative and summing to H x W
    (pycocotools trusts both: far points crash it, short counts give uninitialised memory)."""
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if isinstance(p, list)]
            valid = [
                p for p in polygons
                if len(p) >= 6 and len(p) % 2 == 0 and all(math.isfinite(v) for v in p)
            ]
            dropped = len(segmentation) - len(valid)
            if not valid:
                issue(POLYGON_TOO_FEW_POINTS, "no polygon with at least 3 points")
                return None
            if dropped:
                issue(POLYGON_TOO_FEW_POINTS, f"dropped {dropped} polygon(s) with fewer than 3 "
                      "points", REPAIRED)
            far = _point_out_of_range(valid, height, width)
            if far is not None:
                issue(COORDINATES_OUT_OF_RANGE, f"polygon point {far} (x, y) lies more than "
                      f"{POLYGON_MARGIN:g} image size(s) outside the {height}x{width} image")
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(valid, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            size = [int(v) for v in segmentation.get("size", ())]
            if size != [height, width]:
                issue(BAD_SEGMENTATION, f"RLE size {size} differs from the image's "
                      f"{[height, width]}")
                return None
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed RLE, as crowd regions usually are
                runs = counts
            elif isinstance(counts, (str, bytes)):
                counts = counts.encode() if isinstance(counts, str) else counts
                runs = compressed_rle_counts(counts)
            else:
                raise TypeError(f"RLE counts of type {type(counts).__name__}")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in runs) or sum(runs) != height * width:
                total = sum(v for v in runs if isinstance(v, (int, float)))
                issue(BAD_SEGMENTATION, f"RLE counts are not {len(runs)} non-negative "
                      f"integers summing to {height}x{width}={height * width} (sum {total})")
                return None
            if isinstance(counts, list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": size, "counts": counts}
        else:
            issue(BAD_SEGMENTATION, f"unsupported segmentation of type "
                  f"{type(segmentation).__name__}")
            return None
        return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, OverflowError) as err:
        issue(BAD_SEGMENTATION, f"{type(err).__name__}: {err}")
        return None


def _point_out_of_range(polygons: list[list], height: int, width: int
                        ) -> tuple[float, float] | None:
    """The first (x, y) farther than POLYGON_MARGIN image sizes outside the image, or None."""
    margin_x, margin_y = POLYGON_MARGIN * width, POLYGON_MARGIN * height
    for polygon in polygons:
        for x, y in zip(polygon[0::2], polygon[1::2], strict=True):
            if not (-margin_x <= x <= width + margin_x and -margin_y <= y <= height + margin_y):
                return (x, y)
    return None


def compressed_rle_counts(counts: bytes) -> list[int]:
    """The run lengths a COCO compressed RLE string encodes (LEB128-like: 5 bits per char
    from "0", 0x20 continues, 0x10 on the last char is the sign; from the third run on, each
    value is a difference to the run two before). Raises ValueError for malformed text."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("compressed RLE ends inside a number")
            chunk = counts[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"byte {counts[position]!r} at {position} is not compressed "
                                 "RLE text")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _checked_box(bbox, mask: np.ndarray, height: int, width: int, issue) -> list[float] | None:
    """The annotation's [x, y, w, h] as (y1, x1, y2, x2), clipped to the image when it
    overlaps it; the mask's tight box when the annotation has none."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            issue(ZERO_AREA, "the segmentation covers no pixel and there is no bbox")
            return None
        return [rows[0], cols[0], rows[-1] + 1.0, cols[-1] + 1.0]
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        issue(ZERO_AREA, f"bbox {[x, y, w, h]} has no area")
        return None
    y1, x1, y2, x2 = y, x, y + h, x + w
    cy1, cx1, cy2, cx2 = max(y1, 0.0), max(x1, 0.0), min(y2, float(height)), min(x2, float(width))
    if cy2 <= cy1 or cx2 <= cx1:
        issue(BOX_OUTSIDE_IMAGE, f"bbox {[x, y, w, h]} lies outside the {height}x{width} image")
        return None
    if (cy1, cx1, cy2, cx2) != (y1, x1, y2, x2):
        issue(BOX_CLIPPED, f"bbox {[x, y, w, h]} clipped to the {height}x{width} image",
              REPAIRED)
    return [cy1, cx1, cy2, cx2]
