"""Evaluation metrics: detections → COCO results → pycocotools AP, and matterport's VOC mAP@0.5.

A detection is matterport's per-image dict from `detect()`:
    rois       int32 [N, (y1, x1, y2, x2)] original-image pixels, y2/x2 exclusive
    class_ids  int32 [N] in 1..NUM_CLASSES-1
    scores     float32 [N]
    masks      bool [H, W, N] full-size, original-image coordinates
Ground truth is a COCO json whose category ids equal our class ids.

Undefined metrics (no ground truth to measure against, COCOeval's -1) are None, so they
never read as a score of 0 or -1 in reports and dashboards.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.errors import UserError

IOU_TYPES = ("bbox", "segm")
# The first six entries of COCOeval.stats, in order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
VOC_IOU_THRESHOLD = 0.5
UNMATCHED = -1
DETECTION_KEYS = ("rois", "class_ids", "scores", "masks")


# === COCO ===


def to_coco_results(image_id: int, detection: dict) -> list[dict]:
    """COCO result records for one image: bbox [x, y, w, h] floats, score, category_id and
    segmentation as compressed RLE with `counts` as str (JSON-serialisable)."""
    rois, class_ids, scores, masks = _unpack_detection(detection)
    if len(rois) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8)))
    results = []
    for (y1, x1, y2, x2), class_id, score, rle in zip(rois, class_ids, scores, rles):
        results.append({
            "image_id": int(image_id),
            "category_id": int(class_id),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(score),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        })
    return results


def load_ground_truth(gt: COCO | str | os.PathLike) -> COCO:
    """A pycocotools COCO object from a COCO json path (or the object itself)."""
    if isinstance(gt, COCO):
        return gt
    path = Path(gt)
    if not path.is_file():
        raise UserError(f"ground truth annotations not found: {path} (expected a COCO json file)")
    try:
        with _quiet():
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid COCO annotation file: {err}") from err


def coco_metrics(gt: COCO | str | os.PathLike, results: list[dict], iou_type: str,
                 image_ids: list[int] | None = None) -> dict:
    """COCOeval for `iou_type` ('bbox' or 'segm') over `image_ids` (default: all gt images).

    Returns AP, AP50, AP75, AP_small, AP_medium, AP_large and `per_class` {category name: AP}
    (precision averaged over IoU thresholds and recall points, area 'all', maxDets 100).
    """
    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt = load_ground_truth(gt)
    with _quiet():
        evaluator = COCOeval(gt, _load_results(gt, results, iou_type), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: _defined(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]
    precision = evaluator.eval["precision"]
    area_all = evaluator.params.areaRngLbl.index("all")
    max_dets_100 = evaluator.params.maxDets.index(100)
    metrics["per_class"] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, area_all, max_dets_100]
        values = values[values > -1]
        ap = float(values.mean()) if values.size else None
        metrics["per_class"][gt.cats[cat_id]["name"]] = ap
    return metrics


def _load_results(gt: COCO, results: list[dict], iou_type: str) -> COCO:
    # Each IoU type sees only its own geometry: with a bbox present, loadRes would take a
    # segmentation result's area from the box, misplacing it in the small/medium/large split.
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    records = [{k: v for k, v in r.items() if k != drop} for r in results]
    if records:
        return gt.loadRes(records)  # copies above: loadRes writes ids and areas into them
    # loadRes indexes anns[0]; an empty result set is a results COCO without annotations.
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]),
                     "categories": list(gt.dataset["categories"]), "annotations": []}
    with _quiet():
        empty.createIndex()
    return empty


def _defined(value: float) -> float | None:
    return None if value is None or value < 0 else float(value)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# === VOC mAP@0.5 (matterport's compute_matches + compute_ap) ===


def mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """IoU [A, B] between bool masks [H, W, A] and [H, W, B]; 0 where both masks are empty."""
    flat_a = masks_a.reshape(-1, masks_a.shape[-1]).astype(np.float64)
    flat_b = masks_b.reshape(-1, masks_b.shape[-1]).astype(np.float64)
    intersection = flat_a.T @ flat_b
    union = flat_a.sum(0)[:, None] + flat_b.sum(0)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def match_predictions(gt_class_ids: np.ndarray, gt_masks: np.ndarray,
                      pred_class_ids: np.ndarray, pred_scores: np.ndarray,
                      pred_masks: np.ndarray, iou_threshold: float = VOC_IOU_THRESHOLD,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy mask-IoU matching in decreasing score order (ties keep input order).

    Each prediction takes the highest-IoU gt of its class not matched yet, if that IoU is at
    least `iou_threshold`. Returns (order [N] prediction indices by decreasing score,
    gt_index_per_rank [N] matched gt index or UNMATCHED for the prediction at each rank).

    Matterport tests `gt_match[j] > 0`, so a gt taken by the top-scored prediction (index 0)
    can be matched again; here every matched gt is taken, as its docstring intends.
    """
    order = np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable")
    gt_index_per_rank = np.full(len(order), UNMATCHED, dtype=np.int64)
    if len(order) == 0 or len(gt_class_ids) == 0:
        return order, gt_index_per_rank
    overlaps = mask_iou(pred_masks[..., order], gt_masks)
    gt_taken = np.zeros(len(gt_class_ids), dtype=bool)
    for rank, pred_index in enumerate(order):
        candidates = ~gt_taken & (gt_class_ids == pred_class_ids[pred_index])
        ious = np.where(candidates, overlaps[rank], -1.0)
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold:
            gt_taken[best] = True
            gt_index_per_rank[rank] = best
    return order, gt_index_per_rank


def voc_ap(is_true_positive: np.ndarray, num_gt: int) -> float | None:
    """All-points AP from TP flags in decreasing score order: precision made non-increasing
    from the right, AP = sum over recall steps of (r[i] - r[i-1]) * p[i]. None if num_gt == 0."""
    if num_gt == 0:
        return None
    hits = np.cumsum(np.asarray(is_true_positive, dtype=np.float64))
    precision = np.concatenate([[0.0], hits / np.arange(1, len(hits) + 1), [0.0]])
    recall = np.concatenate([[0.0], hits / num_gt, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def image_ap(ground_truth: dict, detection: dict,
             iou_threshold: float = VOC_IOU_THRESHOLD) -> float | None:
    """Matterport's compute_ap for one image; None when the image has no ground truth
    (matterport divides by zero there)."""
    _, class_ids, scores, masks = _unpack_detection(detection)
    _, gt_matches = match_predictions(ground_truth["class_ids"], ground_truth["masks"],
                                      class_ids, scores, masks, iou_threshold)
    return voc_ap(gt_matches != UNMATCHED, len(ground_truth["class_ids"]))


def voc_metrics(ground_truth_by_image_id: dict[int, dict], detections_by_image_id: dict[int, dict],
                class_ids: list[int], iou_threshold: float = VOC_IOU_THRESHOLD) -> dict:
    """VOC AP@`iou_threshold`: `mAP` is the mean per-image AP over images with ground truth
    (matterport's evaluation loop); `per_class` {class id: AP} pools each class's detections
    over all images, ranked by score (Pascal VOC's per-class AP)."""
    per_image_aps = []
    ranked_by_class = {c: [] for c in class_ids}  # (score, is_tp) over all images
    num_gt_by_class = dict.fromkeys(class_ids, 0)
    for image_id, detection in detections_by_image_id.items():
        truth = ground_truth_by_image_id[image_id]
        _, pred_class_ids, scores, masks = _unpack_detection(detection)
        order, gt_matches = match_predictions(truth["class_ids"], truth["masks"],
                                              pred_class_ids, scores, masks, iou_threshold)
        ap = voc_ap(gt_matches != UNMATCHED, len(truth["class_ids"]))
        if ap is not None:
            per_image_aps.append(ap)
        for pred_index, gt_index in zip(order, gt_matches):
            class_id = int(pred_class_ids[pred_index])
            if class_id in ranked_by_class:
                ranked_by_class[class_id].append((float(scores[pred_index]),
                                                  gt_index != UNMATCHED))
        for class_id in truth["class_ids"]:
            if int(class_id) in num_gt_by_class:
                num_gt_by_class[int(class_id)] += 1
    per_class = {}
    for class_id, ranked in ranked_by_class.items():
        ranked.sort(key=lambda pair: -pair[0])  # stable: ties keep image order
        per_class[class_id] = voc_ap(np.array([tp for _, tp in ranked], dtype=bool),
                                     num_gt_by_class[class_id])
    mean_ap = float(np.mean(per_image_aps)) if per_image_aps else None
    return {"mAP": mean_ap, "per_class": per_class, "num_gt_by_class": num_gt_by_class}


# === Ground truth ===


def ground_truth_instances(gt: COCO, image_id: int) -> dict:
    """One image's non-crowd ground truth as matterport arrays: rois int32 [N, (y1, x1, y2, x2)]
    (tight mask boxes, y2/x2 exclusive), class_ids int32 [N], masks bool [H, W, N]."""
    info = gt.imgs[image_id]
    height, width = int(info["height"]), int(info["width"])
    anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
    masks = np.zeros((height, width, len(anns)), dtype=bool)
    for i, ann in enumerate(anns):
        masks[..., i] = gt.annToMask(ann).astype(bool)
    return {"rois": boxes_from_masks(masks),
            "class_ids": np.array([a["category_id"] for a in anns], dtype=np.int32),
            "masks": masks}


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight boxes int32 [N, (y1, x1, y2, x2)], y2/x2 exclusive, of bool masks [H, W, N];
    zeros for an empty mask (matterport's extract_bboxes)."""
    boxes = np.zeros((masks.shape[-1], 4), dtype=np.int32)
    for i in range(masks.shape[-1]):
        rows = np.flatnonzero(masks[..., i].any(axis=1))
        cols = np.flatnonzero(masks[..., i].any(axis=0))
        if rows.size:
            boxes[i] = [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]
    return boxes


# === Everything together ===


def evaluate_detections(gt_json_path: str | os.PathLike,
                        detections_by_image_id: dict[int, dict],
                        class_names: list[str]) -> dict:
    """All evaluation metrics for detections on the images they were run on.

    `class_names[i]` names class id i (index 0 is the background, as in matterport); the gt
    json's category names must agree. Images absent from `detections_by_image_id` are not
    evaluated; an image with no detections needs an entry with N = 0.
    """
    gt = load_ground_truth(gt_json_path)
    _check_categories(gt, class_names)
    unknown = sorted(set(detections_by_image_id) - set(gt.imgs))
    if unknown:
        raise UserError(f"detections for image ids {unknown[:5]} that are not in {gt_json_path}")
    image_ids = sorted(detections_by_image_id)
    ground_truth = {}
    for image_id in image_ids:
        ground_truth[image_id] = ground_truth_instances(gt, image_id)
        expected = ground_truth[image_id]["masks"].shape[:2]
        found = _unpack_detection(detections_by_image_id[image_id])[3].shape[:2]
        if found != expected:
            raise UserError(f"image {image_id}: detection masks are {found[0]}x{found[1]} but "
                            f"the image is {expected[0]}x{expected[1]}; masks must be in "
                            "original image coordinates")
    results = [record for image_id in image_ids
               for record in to_coco_results(image_id, detections_by_image_id[image_id])]

    metrics: dict = {}
    coco_per_class = {}
    for iou_type in IOU_TYPES:
        coco = coco_metrics(gt, results, iou_type, image_ids=image_ids)
        for name in COCO_STAT_NAMES:
            metrics[f"{iou_type}_m{name}"] = coco[name]  # AP50 → bbox_mAP50
        coco_per_class[iou_type] = coco["per_class"]
    class_ids = list(range(1, len(class_names)))
    voc = voc_metrics(
        {i: ground_truth[i] for i in image_ids},
        {i: detections_by_image_id[i] for i in image_ids},
        class_ids)
    metrics["voc_mAP50"] = voc["mAP"]
    metrics["num_images"] = len(image_ids)
    metrics["num_detections"] = len(results)
    detections_by_class = dict.fromkeys(class_ids, 0)
    for record in results:
        detections_by_class[record["category_id"]] = (
            detections_by_class.get(record["category_id"], 0) + 1)
    metrics["per_class"] = {
        class_names[c]: {
            "bbox_AP": coco_per_class["bbox"].get(class_names[c]),
            "segm_AP": coco_per_class["segm"].get(class_names[c]),
            "voc_AP50": voc["per_class"][c],
            "num_gt": voc["num_gt_by_class"][c],
            "num_detections": detections_by_class[c],
        }
        for c in class_ids
    }
    return metrics


def _check_categories(gt: COCO, class_names: list[str]) -> None:
    for cat_id, cat in sorted(gt.cats.items()):
        if not 1 <= cat_id < len(class_names):
            raise UserError(f"ground truth category id {cat_id} ({cat['name']!r}) is outside the "
                            f"model's classes 1..{len(class_names) - 1}; category ids must equal "
                            "class ids")
        if cat["name"] != class_names[cat_id]:
            raise UserError(f"ground truth category {cat_id} is {cat['name']!r} but class "
                            f"{cat_id} is {class_names[cat_id]!r}; category ids must equal "
                            "class ids")


def _unpack_detection(detection: dict) -> tuple[np.ndarray, ...]:
    missing = [key for key in DETECTION_KEYS if key not in detection]
    if missing:
        raise UserError(f"detection is missing {missing}; expected matterport's detect() dict "
                        f"with keys {list(DETECTION_KEYS)}")
    rois = np.asarray(detection["rois"]).reshape(-1, 4)
    class_ids = np.asarray(detection["class_ids"]).reshape(-1)
    scores = np.asarray(detection["scores"]).reshape(-1)
    masks = np.asarray(detection["masks"], dtype=bool)
    if masks.ndim != 3 or not len(rois) == len(class_ids) == len(scores) == masks.shape[-1]:
        raise UserError(f"detection sizes disagree: rois {rois.shape}, class_ids "
                        f"{class_ids.shape}, scores {scores.shape}, masks {masks.shape} "
                        "(expected [N, 4], [N], [N], [H, W, N])")
    return rois, class_ids, scores, masks
