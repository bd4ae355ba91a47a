"""The evaluation stage: unmolding back to original coordinates, checkpoint lookup, and
`evaluate()` / `mrcnn evaluate` end to end on a tiny shapes dataset with a random model."""

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.cli.main import main
from trainer.config import Config
from trainer.data.transforms import inference_inputs
from trainer.engine.inference import unmold_detections
from trainer.evaluation import run as evaluate_run
from trainer.evaluation.metrics import boxes_from_masks, mask_iou
from trainer.model.image_meta import parse_image_meta

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")
# Scores of 0.0 keep a random model's detections, so masks reach the metrics and pictures.
OVERRIDES = ["BACKBONE=resnet50", "DETECTION_MIN_CONFIDENCE=0.0"]
REQUIRED_KEYS = ("bbox_mAP", "bbox_mAP50", "segm_mAP", "segm_mAP50", "voc_mAP50")


def demo_config(*overrides: str) -> Config:
    return Config.from_yaml(DEMO, [*OVERRIDES, *overrides])


# === Unmolding an identity model's output ===


def rectangle(shape, y1, x1, y2, x2):
    mask = np.zeros(shape, dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def disk(shape, cy, cx, radius):
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2


def identity_outputs(masks: np.ndarray, class_ids: np.ndarray, config: Config):
    """What a perfect model outputs for bool gt masks [H, W, N]: each gt box carried through
    the resize (edges scale by resized/original size) and the padding into the molded image,
    normalised as matterport's norm_boxes (y2/x2 exclusive: minus 1, over size - 1); each gt
    mask cropped to its box and resized to MASK_SHAPE (the mask head's training target).
    Returns (detections [D, 6], mask probabilities [D, h, w, NUM_CLASSES], meta fields)."""
    height, width = masks.shape[:2]
    meta = inference_inputs(tf.zeros([height, width, 3], tf.uint8), config)["input_image_meta"]
    fields = {k: np.asarray(v) for k, v in parse_image_meta(meta).items()}
    molded_h, molded_w = fields["image_shape"][:2]
    top, left, bottom, right = fields["window"]
    scale_y, scale_x = (bottom - top) / height, (right - left) / width
    boxes = boxes_from_masks(masks).astype(np.float64)
    molded = boxes * [scale_y, scale_x, scale_y, scale_x] + [top, left, top, left]
    normalised = (molded - [0, 0, 1, 1]) / [molded_h - 1, molded_w - 1, molded_h - 1, molded_w - 1]

    count, mask_shape = len(class_ids), tuple(config.MASK_SHAPE)
    detections = np.zeros((config.DETECTION_MAX_INSTANCES, 6), np.float32)  # zero rows: padding
    detections[:count, :4] = normalised
    detections[:count, 4] = class_ids
    detections[:count, 5] = np.linspace(0.9, 0.6, count)
    probabilities = np.zeros((config.DETECTION_MAX_INSTANCES, *mask_shape, config.NUM_CLASSES),
                             np.float32)
    for i, (y1, x1, y2, x2) in enumerate(boxes.astype(int)):
        crop = masks[y1:y2, x1:x2, i, None].astype(np.float32)
        probabilities[i, ..., class_ids[i]] = tf.image.resize(crop, mask_shape).numpy()[..., 0]
    return detections, probabilities, fields


# Non-square images, each landing in the molded image differently: scaled down to 77x128 and
# padded to a square; scaled up to 128x213 and padded to 128x256 (pad64); not scaled, only
# padded to 128x192 (pad64); tall instead of wide; scaled down 6x to 102x128, where
# matterport's corner-aligned inverse, (oh - 1) / (h - 1) for oh / h, put boxes 5 px off.
GEOMETRIES = [
    ((96, 160), ()),
    ((96, 160), ("IMAGE_RESIZE_MODE=pad64", "IMAGE_MIN_DIM=128")),
    ((96, 160), ("IMAGE_RESIZE_MODE=pad64", "IMAGE_MIN_DIM=64")),
    ((160, 96), ()),
    ((640, 800), ()),
]


@pytest.mark.parametrize("shape,overrides", GEOMETRIES)
def test_unmold_identity_output_gives_back_ground_truth(shape, overrides):
    config = demo_config(*overrides)
    height, width = shape
    objects = [
        (1, rectangle(shape, 10, 20, 50, 70)),
        (1, rectangle(shape, 70, 50, height, width)),  # touches the bottom-right border
        (2, rectangle(shape, 0, 0, 9, 13)),  # touches the top-left corner
        (3, disk(shape, 40, 60, 18)),
    ]
    class_ids = np.array([c for c, _ in objects], np.int32)
    masks = np.stack([m for _, m in objects], axis=-1)
    detections, probabilities, fields = identity_outputs(masks, class_ids, config)
    assert tuple(fields["original_image_shape"][:2]) == shape
    assert tuple(fields["image_shape"][:2]) != shape  # resize and/or padding happened

    result = unmold_detections(detections, probabilities, fields["original_image_shape"],
                               fields["image_shape"], fields["window"])

    np.testing.assert_array_equal(result["rois"], boxes_from_masks(masks))
    np.testing.assert_array_equal(result["class_ids"], class_ids)
    np.testing.assert_allclose(result["scores"], np.linspace(0.9, 0.6, 4), rtol=1e-6)
    assert result["masks"].shape == (*shape, 4)
    # A rectangle fills its own box, so its 28x28 mask is all ones and comes back exactly.
    np.testing.assert_array_equal(result["masks"][..., :3], masks[..., :3])
    # The disk went through a 28x28 grid over its 37x37 box: only its rim can differ.
    assert mask_iou(result["masks"][..., 3:], masks[..., 3:])[0, 0] >= 0.95


def test_unmold_without_detections_is_empty():
    config = demo_config()
    _, probabilities, fields = identity_outputs(np.zeros((96, 160, 0), bool),
                                                np.zeros(0, np.int32), config)
    result = unmold_detections(np.zeros((config.DETECTION_MAX_INSTANCES, 6), np.float32),
                               probabilities, fields["original_image_shape"],
                               fields["image_shape"], fields["window"])
    assert result["rois"].shape == (0, 4) and result["masks"].shape == (96, 160, 0)


# === Pieces ===


def test_rle_masks_decode_to_the_same_masks():
    masks = np.stack([disk((30, 40), 10, 12, 6), rectangle((30, 40), 0, 30, 30, 40)], axis=-1)
    packed = evaluate_run.RleMasks(masks)
    np.testing.assert_array_equal(np.asarray(packed, dtype=bool), masks)
    assert np.asarray(evaluate_run.RleMasks(np.zeros((30, 40, 0), bool))).shape == (30, 40, 0)


# === End to end ===


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 64 px shapes dataset with 6 val images and random weights saved as a checkpoint."""
    from trainer.data.prepare import prepare_dataset
    from trainer.engine.maskrcnn import MaskRCNN
    from trainer.weights.by_name import save_weights

    root = tmp_path_factory.mktemp("evaluate")
    summary = prepare_dataset("shapes", root / "data", count=20, image_size=64,
                              val_fraction=0.4, shards=1, workers=1, progress=False)
    assert 4 <= summary["splits"]["val"]["images"] <= 6
    keras.utils.set_random_seed(0)
    model = MaskRCNN("training", demo_config())
    weights = root / "runs" / "demo20250101T1200" / "mask_rcnn_demo_0001.h5"
    weights.parent.mkdir(parents=True)
    save_weights(model.keras_model, weights)
    return {"root": root, "data": root / "data", "weights": weights,
            "val_images": summary["splits"]["val"]["images"]}



def val_images(data_dir: Path) -> dict[int, np.ndarray]:
    from trainer.data.input import examples

    return {int(e["source_id"]): e["image"]
            for e in examples(str(data_dir), "val").as_numpy_iterator()}


def test_evaluate_writes_metrics_report_and_pictures(prepared, capsys):
    out = prepared["root"] / "eval"
    result = evaluate_run.evaluate(demo_config(), prepared["weights"], prepared["data"], out,
                                   min_map=-1.0, num_pictures=3)

    assert result["num_images"] == prepared["val_images"]
    assert result["num_detections"] > 0  # confidence 0: the random model's boxes are kept
    written = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert written[key] is None or 0.0 <= written[key] <= 1.0, key
        assert written[key] == result[key]
    # Every val image has ground truth, so every COCO AP and the VOC mAP are defined numbers.
    assert all(isinstance(result[key], float) for key in REQUIRED_KEYS)
    assert result["gate"] == {"passed": True, "key": "segm_mAP", "value": result["segm_mAP"],
                              "threshold": -1.0}
    assert result["images_per_second"] > 0
    assert set(result["per_class"]) == {"square", "circle", "triangle"}
    report = (out / "report.md").read_text()
    assert "| segm_mAP |" in report and "passed" in report and "](pictures/image-" in report
    assert "images/s" in capsys.readouterr().err  # progress

    images = val_images(prepared["data"])
    assert len(result["pictures"]) == 3
    for relative in result["pictures"]:
        image_id = int(Path(relative).stem.split("-")[1])
        picture = np.asarray(Image.open(out / relative).convert("RGB"))
        # enlarged by a whole factor so the labels can be read (PICTURE_MIN_SIDE)
        factor = -(-evaluate_run.PICTURE_MIN_SIDE // min(images[image_id].shape[:2]))
        plain = images[image_id].repeat(factor, axis=0).repeat(factor, axis=1)
        assert picture.shape == (plain.shape[0], 2 * plain.shape[1], 3)  # prediction | truth
        truth_half = picture[:, plain.shape[1]:]
        assert (truth_half != plain).any(axis=-1).mean() > 0.02  # ground truth masks drawn
        assert (picture[:, :plain.shape[1]] != plain).any()  # predictions drawn


def test_evaluate_with_ground_truth_as_detections_scores_1(prepared, monkeypatch):
    """A model that "detects" each image's own ground truth: every metric is 1.0 only if each
    image's detections reach the COCO image id of that image (source_id mapping, grouping
    into batches, a short last batch; detect() fills it up itself, see test_maskrcnn)."""
    from trainer.data.input import examples
    from trainer.engine.maskrcnn import MaskRCNN

    truth_by_pixels = {}
    for e in examples(str(prepared["data"]), "val").as_numpy_iterator():
        truth_by_pixels[e["image"].tobytes()] = {
            "rois": boxes_from_masks(e["masks"]), "class_ids": e["class_ids"],
            "scores": np.ones(len(e["class_ids"]), np.float32), "masks": e["masks"]}
    calls = []

    def oracle_detect(self, images, verbose=0):
        calls.append(len(images))
        return [truth_by_pixels[np.asarray(image).tobytes()] for image in images]

    monkeypatch.setattr(MaskRCNN, "detect", oracle_detect)
    limit = 5  # odd: the last batch holds one image
    result = evaluate_run.evaluate(demo_config(), prepared["weights"], prepared["data"],
                                   prepared["root"] / "oracle", limit=limit, num_pictures=0,
                                   progress=False)
    assert calls == [2, 2, 1]
    assert result["num_images"] == limit and result["pictures"] == []
    for key in REQUIRED_KEYS + ("bbox_mAP75", "segm_mAP75"):
        assert result[key] == pytest.approx(1.0), key


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", "--config", DEMO, *(f"--set={o}" for o in OVERRIDES), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_limit_and_failed_gate_exits_0(prepared, capsys):
    out = prepared["root"] / "cli"
    code, stdout, _ = run_cli(capsys, "--weights", str(prepared["weights"]), "--data",
                              str(prepared["data"]), "--out", str(out), "--limit", "3",
                              "--min-map", "1.01", "--pictures", "1", "--json")
    assert code == 0  # a failed gate is a result, not an error
    result = json.loads(stdout)
    assert result["num_images"] == 3  # --limit; also a short last batch (BATCH_SIZE 2)
    assert result["gate"]["passed"] is False and result["gate"]["threshold"] == 1.01
    assert result["pictures"] == [str(p.relative_to(out)) for p in (out / "pictures").iterdir()]


def test_cli_fail_on_gate_with_last_checkpoint(prepared, capsys):
    out = prepared["root"] / "gate"
    code, stdout, _ = run_cli(capsys, "--weights", "last", "--model-dir",
                              str(prepared["root"] / "runs"), "--data", str(prepared["data"]),
                              "--out", str(out), "--limit", "2", "--min-map", "1.01",
                              "--gate-key", "voc_mAP50", "--fail-on-gate")
    assert code == 1
    assert "gate FAILED (voc_mAP50 >= 1.01)" in stdout
    written = json.loads((out / "metrics.json").read_text())
    assert written["weights"] == str(prepared["weights"])  # "last" found the checkpoint


@pytest.mark.parametrize("change,message", [
    ({"--data": "missing-dir"}, "not a local prepared dataset"),
    ({"--weights": "missing.h5"}, "weights file"),
    ({"--weights": "last"}, "model dir runs is not a folder"),  # the default
    ({"--gate-key": "accuracy"}, "--gate-key 'accuracy' is not a metric"),
    ({"--limit": "0"}, "--limit must be >= 1"),
    ({"--set": "IMAGE_RESIZE_MODE=crop"}, "IMAGE_RESIZE_MODE=crop takes random crops"),
])
def test_cli_bad_input_exits_2_with_one_line(prepared, capsys, tmp_path, monkeypatch, change,
                                             message):
    monkeypatch.chdir(tmp_path)
    options = {"--weights": str(prepared["weights"]), "--data": str(prepared["data"]),
               "--out": str(tmp_path / "out"), **change}
    code, _, stderr = run_cli(capsys, *[part for pair in options.items() for part in pair])
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("mrcnn evaluate: error: ")
    assert message in stderr
