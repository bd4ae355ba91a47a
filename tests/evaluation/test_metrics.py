import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from trainer.errors import UserError
from trainer.evaluation import metrics as evaluation
from trainer.evaluation import pictures as visualize
from trainer.evaluation import report

CLASS_NAMES = ["BG", "square", "triangle"]
SIZE = 64


def rectangle(y1, x1, y2, x2):
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def triangle(top, left, side):
    """Right triangle with its right angle at the bottom left; rows widen downwards."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    for row in range(side):
        mask[top + row, left:left + row + 1] = True
    return mask


# image id → [(class id, mask)]; image 3 has a polygon annotation to exercise that path.
SCENES = {
    1: [(1, rectangle(4, 4, 20, 24)), (2, triangle(30, 30, 20))],
    2: [(2, triangle(2, 2, 30)), (1, rectangle(40, 10, 60, 50)), (1, rectangle(5, 40, 25, 60))],
    3: [(1, rectangle(10, 10, 50, 50))],
}
POLYGON = {"image_id": 3, "category_id": 2, "points": [40, 2, 60, 2, 60, 12, 40, 12]}  # x, y


def decoded_polygon():
    rles = mask_utils.frPyObjects([POLYGON["points"]], SIZE, SIZE)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def make_gt_json(path):
    annotations = []
    for image_id, objects in SCENES.items():
        for class_id, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"image_id": image_id, "category_id": class_id,
                                "segmentation": rle, "mask": mask})
    annotations.append({"image_id": 3, "category_id": 2, "segmentation": [POLYGON["points"]],
                        "mask": decoded_polygon()})
    for ann_id, ann in enumerate(annotations, start=1):
        mask = ann.pop("mask")
        (y1, x1, y2, x2), = evaluation.boxes_from_masks(mask[..., None])
        # COCO's area is the mask's, not the box's.
        ann.update(id=ann_id, iscrowd=0, bbox=[int(x1), int(y1), int(x2 - x1), int(y2 - y1)],
                   area=int(mask.sum()))
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE}
                   for i in SCENES],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES) if i],
    }
    path.write_text(json.dumps(dataset))
    return path


@pytest.fixture
def gt_path(tmp_path):
    return make_gt_json(tmp_path / "val_annotations.json")


def detection(objects, scores=None):
    """Detection dict from [(class id, mask)] with boxes from the masks."""
    masks = np.stack([m for _, m in objects], axis=-1) if objects else np.zeros((SIZE, SIZE, 0),
                                                                                bool)
    return {"rois": evaluation.boxes_from_masks(masks),
            "class_ids": np.array([c for c, _ in objects], dtype=np.int32),
            "scores": np.array(scores if scores is not None else [1.0] * len(objects),
                               dtype=np.float32),
            "masks": masks}


def ground_truth_as_detections(gt_path):
    gt = COCO(str(gt_path))
    detections = {}
    for image_id in SCENES:
        truth = evaluation.ground_truth_instances(gt, image_id)
        detections[image_id] = dict(truth, scores=np.ones(len(truth["class_ids"]), np.float32))
    return detections


# === COCO results ===


def test_to_coco_results_converts_boxes_and_encodes_masks():
    mask = rectangle(4, 6, 20, 30)
    records = evaluation.to_coco_results(7, detection([(2, mask)], scores=[0.75]))
    assert len(records) == 1
    record = records[0]
    assert record["image_id"] == 7 and record["category_id"] == 2 and record["score"] == 0.75
    assert record["bbox"] == [6.0, 4.0, 24.0, 16.0]  # x = x1, y = y1, w = 30 - 6, h = 20 - 4
    assert isinstance(record["segmentation"]["counts"], str)
    json.dumps(records)  # serialisable as is
    decoded = mask_utils.decode({"size": record["segmentation"]["size"],
                                 "counts": record["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    assert evaluation.to_coco_results(7, detection([])) == []


# === Whole evaluation ===


def test_ground_truth_as_predictions_scores_one_everywhere(gt_path):
    metrics = evaluation.evaluate_detections(gt_path, ground_truth_as_detections(gt_path),
                                             CLASS_NAMES)
    for key in ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "segm_mAP", "segm_mAP50", "segm_mAP75",
                "bbox_mAP_small", "segm_mAP_small", "voc_mAP50"):
        assert metrics[key] == pytest.approx(1.0), key
    # The largest object is 40x40 = 1600 px: no "large" (> 96^2) ground truth, so undefined.
    assert metrics["bbox_mAP_large"] is None and metrics["segm_mAP_large"] is None
    assert metrics["num_images"] == 3
    assert metrics["num_detections"] == 7
    for name in ("square", "triangle"):
        row = metrics["per_class"][name]
        assert row["bbox_AP"] == pytest.approx(1.0)
        assert row["segm_AP"] == pytest.approx(1.0)
        assert row["voc_AP50"] == pytest.approx(1.0)
    assert metrics["per_class"]["square"]["num_gt"] == 4
    assert metrics["per_class"]["triangle"]["num_gt"] == 3


def test_empty_predictions_score_zero(gt_path):
    empty = {image_id: detection([]) for image_id in SCENES}
    metrics = evaluation.evaluate_detections(gt_path, empty, CLASS_NAMES)
    for key in ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "segm_mAP", "segm_mAP50", "segm_mAP75",
                "voc_mAP50"):
        assert metrics[key] == 0.0, key
    assert metrics["num_detections"] == 0
    assert metrics["per_class"]["triangle"]["segm_AP"] == 0.0
    assert metrics["per_class"]["triangle"]["voc_AP50"] == 0.0
    assert evaluation.coco_metrics(gt_path, [], "segm")["AP"] == 0.0


def test_known_ap_with_a_higher_scored_false_positive(gt_path):
    # Image 1 only: gt square A and gt triangle B. Predictions: a square where nothing is
    # (score 0.9, FP) and A exactly (score 0.8, TP); B is missed.
    fp = rectangle(44, 2, 60, 18)
    _, square_a = SCENES[1][0]
    dets = {1: detection([(1, fp), (1, square_a)], scores=[0.9, 0.8])}
    metrics = evaluation.evaluate_detections(gt_path, dets, CLASS_NAMES)
    # VOC per image, ranked FP, TP: precision [0, 1/2], recall [0, 1/2] of 2 gt.
    # Padded p [0, 0, .5, 0], r [0, 0, .5, 1]; non-increasing p [.5, .5, .5, 0].
    # AP = (.5 - 0) * .5 + (1 - .5) * 0 = 0.25.
    assert metrics["voc_mAP50"] == pytest.approx(0.25)
    # Per class, square: FP then TP of 1 gt → p = .5 at recall 1 → AP 0.5; triangle missed → 0.
    assert metrics["per_class"]["square"]["voc_AP50"] == pytest.approx(0.5)
    assert metrics["per_class"]["triangle"]["voc_AP50"] == 0.0
    # COCO, every IoU threshold alike (the TP is exact, the FP overlaps nothing): square's
    # interpolated precision is 0.5 at all 101 recall points → 0.5; triangle 0; mean 0.25.
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_mAP"] == pytest.approx(0.25)
        assert metrics[f"{iou_type}_mAP50"] == pytest.approx(0.25)
        assert metrics["per_class"]["square"][f"{iou_type}_AP"] == pytest.approx(0.5)
        assert metrics["per_class"]["triangle"][f"{iou_type}_AP"] == 0.0


def test_coco_ap_half_recall_uses_101_recall_points(gt_path):
    # Image 2 alone, one of its two squares found exactly: recall 1/2 at precision 1 at every
    # IoU threshold, so 51 of the 101 recall points (0.00 .. 0.50) have precision 1.
    gt = COCO(str(gt_path))
    _, found = SCENES[2][1]
    results = evaluation.to_coco_results(2, detection([(1, found)], scores=[0.9]))
    metrics = evaluation.coco_metrics(gt, results, "segm", image_ids=[2])
    assert metrics["per_class"]["square"] == pytest.approx(51 / 101)
    assert metrics["per_class"]["triangle"] == 0.0  # its triangle is missed
    assert metrics["AP"] == pytest.approx((51 / 101 + 0.0) / 2)


def test_false_positive_falls_in_the_area_range_of_its_own_geometry(gt_path):
    # Ground truth as predictions, plus a higher-scored triangle FP in image 3 (no triangle
    # gt near it) whose mask is small (40 * 41 / 2 = 820 < 32^2 px) but whose box is medium
    # (40 * 40 = 1600 px).
    detections = ground_truth_as_detections(gt_path)
    fp = detection([(2, triangle(20, 5, 40))], scores=[1.5])
    detections[3] = {key: np.concatenate([detections[3][key], fp[key]], axis=-1 if key == "masks"
                                         else 0) for key in evaluation.DETECTION_KEYS}
    metrics = evaluation.evaluate_detections(gt_path, detections, CLASS_NAMES)
    # segm, small: the triangle class ranks FP, TP, TP, TP over its 3 small gt → interpolated
    # precision 3/4 at every recall; the square class stays 1 → (1 + 0.75) / 2.
    assert metrics["segm_mAP_small"] == pytest.approx(0.875)
    # bbox: the FP's box is medium, so the small range ignores it; the medium range has no
    # triangle gt, so the triangle class is left out there.
    assert metrics["bbox_mAP_small"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_medium"] == pytest.approx(1.0)
    # VOC, image 3: FP, TP, TP of 2 gt → precision 1/2 then 2/3, made non-increasing → 2/3 at
    # both recall steps → AP 2/3; images 1 and 2 stay 1 → mean 8/9.
    assert metrics["voc_mAP50"] == pytest.approx(8 / 9)


def test_evaluate_rejects_mismatched_input(gt_path):
    with pytest.raises(UserError, match="not in"):
        evaluation.evaluate_detections(gt_path, {99: detection([])}, CLASS_NAMES)
    with pytest.raises(UserError, match="category 1 is 'square' but class 1 is 'circle'"):
        evaluation.evaluate_detections(gt_path, {1: detection([])}, ["BG", "circle", "triangle"])
    small = {"rois": np.zeros((0, 4), np.int32), "class_ids": np.zeros(0, np.int32),
             "scores": np.zeros(0, np.float32), "masks": np.zeros((32, 32, 0), bool)}
    with pytest.raises(UserError, match="original image coordinates"):
        evaluation.evaluate_detections(gt_path, {1: small}, CLASS_NAMES)
    with pytest.raises(UserError, match="missing"):
        evaluation.evaluate_detections(gt_path, {1: {"rois": []}}, CLASS_NAMES)
    with pytest.raises(UserError, match="not found"):
        evaluation.evaluate_detections(gt_path.parent / "nope.json", {}, CLASS_NAMES)


# === VOC against an independent NumPy reference ===


def reference_voc(truth_boxes, truth_classes, pred_boxes, pred_classes, pred_scores):
    """AP of one image where every mask is its box: IoU from box geometry, and AP as the sum
    over true positives (in score order) of 1/num_gt times the best precision at that rank or
    any later one."""
    def box_iou(a, b):
        height = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        width = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = height * width
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        return inter / (area(a) + area(b) - inter)

    ranking = sorted(range(len(pred_scores)), key=lambda i: -pred_scores[i])
    taken = set()
    flags = []
    for i in ranking:
        best, best_iou = None, 0.5
        for j in range(len(truth_boxes)):
            iou = box_iou(pred_boxes[i], truth_boxes[j])
            if j not in taken and truth_classes[j] == pred_classes[i] and iou >= best_iou:
                if best is None or iou > best_iou:
                    best, best_iou = j, iou
        if best is not None:
            taken.add(best)
        flags.append(best is not None)
    tp = np.cumsum(flags)
    precision_at_rank = tp / np.arange(1, len(flags) + 1)
    return sum(precision_at_rank[k:].max() / len(truth_boxes)
               for k in range(len(flags)) if flags[k])


def random_boxes(rng, count, size=32):
    y1, x1 = rng.integers(0, size - 6, (2, count))
    heights, widths = rng.integers(4, 14, (2, count))
    return [(int(a), int(b), int(min(a + h, size)), int(min(b + w, size)))
            for a, b, h, w in zip(y1, x1, heights, widths)]


def jitter(rng, box, size=32):
    shift = rng.integers(-2, 3, 4)
    y1, x1 = max(0, box[0] + shift[0]), max(0, box[1] + shift[1])
    return (y1, x1, max(y1 + 1, min(size, box[2] + shift[2])),
            max(x1 + 1, min(size, box[3] + shift[3])))


def box_masks(boxes, size=32):
    masks = np.zeros((size, size, len(boxes)), dtype=bool)
    for i, (y1, x1, y2, x2) in enumerate(boxes):
        masks[y1:y2, x1:x2, i] = True
    return masks


@pytest.mark.parametrize("seed", range(12))
def test_voc_ap_matches_independent_reference(seed):
    rng = np.random.default_rng(seed)
    truth_boxes = random_boxes(rng, int(rng.integers(1, 6)))
    truth_classes = rng.integers(1, 3, len(truth_boxes)).tolist()
    # Near-copies of some gt (sometimes the wrong class), plus random boxes.
    pred_boxes, pred_classes = [], []
    for box, class_id in zip(truth_boxes, truth_classes):
        for _ in range(int(rng.integers(0, 3))):
            pred_boxes.append(jitter(rng, box))
            pred_classes.append(class_id if rng.random() < 0.8 else 3 - class_id)
    extra = random_boxes(rng, int(rng.integers(0, 6)))
    pred_boxes += extra
    pred_classes += rng.integers(1, 3, len(extra)).tolist()
    pred_scores = rng.permutation(len(pred_boxes)) / max(1, len(pred_boxes)) + 0.01

    truth = {"class_ids": np.array(truth_classes), "masks": box_masks(truth_boxes)}
    dets = {"rois": np.array(pred_boxes, np.int32).reshape(-1, 4),
            "class_ids": np.array(pred_classes, np.int32),
            "scores": np.array(pred_scores, np.float32), "masks": box_masks(pred_boxes)}
    expected = reference_voc(truth_boxes, truth_classes, pred_boxes, pred_classes, pred_scores)
    assert evaluation.image_ap(truth, dets) == pytest.approx(expected)


def test_voc_helpers_edge_cases():
    assert evaluation.voc_ap(np.array([], bool), 0) is None  # no gt: undefined
    assert evaluation.voc_ap(np.array([], bool), 3) == 0.0
    assert evaluation.voc_ap(np.array([True, False, True]), 2) == pytest.approx(
        0.5 * 1.0 + 0.5 * (2 / 3))  # TPs at ranks 1 and 3
    # FP first: raw precision 1/2 at the first TP is raised to the later 2/3.
    assert evaluation.voc_ap(np.array([False, True, True]), 2) == pytest.approx(2 / 3)
    a = box_masks([(0, 0, 4, 4), (0, 0, 0, 0)])
    b = box_masks([(0, 0, 4, 8), (0, 0, 0, 0)])
    # 16 / 32 overlap; empty vs empty is 0, not NaN.
    np.testing.assert_allclose(evaluation.mask_iou(a, b), [[0.5, 0.0], [0.0, 0.0]])


def test_a_gt_matched_by_the_top_prediction_is_not_matched_again():
    # Two equal predictions on one gt: the second is a FP (matterport's `> 0` test would make it
    # a TP too, for AP 1 at recall 2/1).
    truth = {"class_ids": np.array([1]), "masks": box_masks([(2, 2, 10, 10)])}
    dets = {"rois": np.array([[2, 2, 10, 10]] * 2, np.int32), "class_ids": np.array([1, 1]),
            "scores": np.array([0.9, 0.8]), "masks": box_masks([(2, 2, 10, 10)] * 2)}
    assert evaluation.image_ap(truth, dets) == pytest.approx(1.0)
    order, matches = evaluation.match_predictions(truth["class_ids"], truth["masks"],
                                                  dets["class_ids"], dets["scores"],
                                                  dets["masks"])
    assert matches.tolist() == [0, evaluation.UNMATCHED]


def test_iou_of_exactly_one_half_is_a_match():
    truth = {"class_ids": np.array([1]), "masks": box_masks([(0, 0, 4, 8)])}
    half = {"rois": np.array([[0, 0, 4, 4]], np.int32), "class_ids": np.array([1]),
            "scores": np.array([0.9]), "masks": box_masks([(0, 0, 4, 4)])}  # 16 / 32 px
    assert evaluation.image_ap(truth, half) == 1.0
    less = dict(half, masks=box_masks([(0, 0, 3, 5)]))  # 15 / 32 px
    assert evaluation.image_ap(truth, less) == 0.0


# === Reports and gate ===


def test_write_metrics_and_gate(tmp_path, gt_path):
    metrics = evaluation.evaluate_detections(gt_path, ground_truth_as_detections(gt_path),
                                             CLASS_NAMES)
    (tmp_path / "eval").mkdir()
    paths = report.write_reports(tmp_path / "eval", metrics)
    assert json.loads(paths["metrics"].read_text()) == json.loads(json.dumps(metrics))
    text = paths["report"].read_text()
    assert "| segm_mAP | 1.0000 |" in text
    assert "| bbox_mAP_large | n/a |" in text
    assert "| triangle | 1.0000 | 1.0000 | 1.0000 | 3 | 3 |" in text
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json", "report.md"]

    metrics = {"segm_mAP": 0.4, "bbox_mAP": None}
    assert report.gate(metrics, 0.4) == {"passed": True, "key": "segm_mAP", "value": 0.4,
                                             "threshold": 0.4}
    assert report.gate(metrics, 0.41)["passed"] is False
    assert report.gate(metrics, None)["passed"] is True
    assert report.gate(metrics, 0.1, key="bbox_mAP")["passed"] is False
    with pytest.raises(UserError, match="voc_mAP50"):
        report.gate(metrics, 0.1, key="voc_mAP50")


# === Pictures ===


def test_draw_predictions_marks_masks_and_leaves_the_rest(tmp_path):
    image = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
    square = rectangle(4, 4, 20, 24)
    dets = detection([(1, square)], scores=[0.87])
    picture = visualize.draw_predictions(image, dets, CLASS_NAMES)
    assert picture.shape == image.shape and picture.dtype == np.uint8
    assert not np.array_equal(picture[12, 14], image[12, 14])  # inside the mask
    np.testing.assert_array_equal(picture[40:, 30:], image[40:, 30:])  # far from it
    assert (picture[10:18, 4] != 40).any()  # the box's left edge, below the label

    truth = detection([(2, triangle(30, 30, 20))])
    both = visualize.draw_predictions(image, dets, CLASS_NAMES, ground_truth=truth)
    assert both.shape == (SIZE, 2 * SIZE, 3)
    np.testing.assert_array_equal(both[:, :SIZE], picture)
    assert not np.array_equal(both[45, SIZE + 35], image[45, 35])  # gt triangle, right half
    np.testing.assert_array_equal(both[:, SIZE:][40:, :20], image[40:, :20])

    visualize.save_png(tmp_path / "pred.png", both)
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred.png")), both)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.png"]


def test_the_html_report_is_real_tables_and_inlined_readable_pictures(tmp_path, gt_path):
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    metrics = evaluation.evaluate_detections(gt_path, ground_truth_as_detections(gt_path),
                                             CLASS_NAMES)
    verdict = report.gate(metrics, 0.5, "segm_mAP")
    image = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
    truth = {"rois": np.array([[4, 4, 20, 24]]), "class_ids": np.array([1]),
             "masks": box_masks([(4, 4, 20, 24)], size=SIZE)}
    picture = visualize.draw_predictions(image, {**truth, "scores": np.array([0.9])},
                                         CLASS_NAMES, truth, min_side=384)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    page = report.render_html({**metrics, "gate": verdict, "pictures": ["pictures/a.png"]},
                              verdict, {"pictures/a.png": buffer.getvalue()})

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell, self.images, self.links, self.text = {}, None, [], [], []
            self.table = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.table = self.tables.setdefault(attrs.get("id"), [])
            elif tag == "tr" and self.table is not None:
                self.table.append([])
            elif tag in ("td", "th") and self.table is not None:
                self.cell = ""
            elif tag == "img":
                self.images.append(attrs["src"])
            for key in ("href", "src"):
                if key in attrs:
                    self.links.append(attrs[key])

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.table[-1].append(self.cell.strip())
                self.cell = None
            elif tag == "table":
                self.table = None

        def handle_data(self, data):
            self.text.append(data)
            if self.cell is not None:
                self.cell += data

    reader = Reader()
    reader.feed(page)
    assert ["segm_mAP", "1.0000"] in reader.tables["metrics"]
    assert ["bbox_mAP_large", "n/a"] in reader.tables["metrics"]
    assert ["triangle", "1.0000", "1.0000", "1.0000", "3", "3"] in reader.tables["per-class"]
    assert "Quality gate PASSED" in "".join(reader.text)
    [src] = reader.images
    assert all(link.startswith("data:") for link in reader.links)  # self-contained
    shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert min(shown.size) >= 384  # a 64 px image is enlarged: labels stay readable
