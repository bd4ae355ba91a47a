"""`mrcnn evaluate`: a trained model on the validation shards -> metrics, report, pictures.

    evaluate(config, "runs/demo20250101T1200/mask_rcnn_demo_0004.h5", "data/", "eval/")

reads the val split's decoded examples (original images), runs the inference model on
BATCH_SIZE images at a time, scores the detections against `val_annotations.json` with
`trainer.evaluation.metrics` and writes into `out_dir`:

    metrics.json      every metric, the images/second, the weights used, the gate result
    report.md         Markdown tables of the same, the gate, links to the pictures
    pictures/*.png    a few images: predictions (left) beside the ground truth (right)

The metrics core lives in `trainer.evaluation.metrics`; this module only runs the model and files.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from trainer.config import Config
from trainer.data.input import check_classes, examples, read_dataset_info
from trainer.engine.inference import batches_by_shape, molded_shape
from trainer.engine.maskrcnn import MaskRCNN
from trainer.errors import UserError
from trainer.evaluation.metrics import (
    COCO_STAT_NAMES,
    IOU_TYPES,
    evaluate_detections,
    ground_truth_instances,
    load_ground_truth,
)
from trainer.evaluation.pictures import draw_predictions, save_png
from trainer.evaluation.report import gate, write_reports
from trainer.progress import Progress
from trainer.weights.checkpoints import find_last_checkpoint

LAST = "last"
PICTURES_DIR = "pictures"
PICTURE_MIN_SIDE = 384  # px: small images are enlarged so the labels can be read
PICTURE_NAME = re.compile(r"^image-\d+\.png$")
# Every metric the gate can test: bbox_mAP ... segm_mAP_large, voc_mAP50.
GATE_KEYS = tuple(f"{t}_m{n}" for t in IOU_TYPES for n in COCO_STAT_NAMES) + ("voc_mAP50",)


# === Weights ===


def resolve_weights(weights: str | Path, model_dir: str | Path | None, config: Config) -> Path:
    """`weights` as an existing file path; "last" is the newest checkpoint of config.NAME."""
    if str(weights) == LAST:
        return find_last_checkpoint(model_dir if model_dir is not None else "runs",
                                    config.NAME.lower())
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: pass a .h5 path or 'last'")
    return path


# === Inference ===


class RleMasks:
    """bool masks [H, W, N] held as COCO RLE; `np.asarray` decodes them.

    A full evaluation keeps every image's detections until COCOeval runs: as dense masks, a
    COCO val run (5000 images, 100 detections of 640x480) would need 150 GB; as RLE, MBs.
    """

    def __init__(self, masks: np.ndarray):
        self.shape = tuple(masks.shape)
        self._rles = (mask_utils.encode(np.asfortranarray(masks.astype(np.uint8)))
                      if self.shape[-1] else [])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if not self._rles:
            return np.zeros(self.shape, dtype=dtype or bool)
        return mask_utils.decode(self._rles).astype(dtype or bool)


# === The stage ===


def evaluate(config: Config, weights: str | Path, data_dir: str | Path, out_dir: str | Path, *,
             limit: int | None = None, min_map: float | None = None,
             gate_key: str = "segm_mAP", num_pictures: int = 4,
             model_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluates `weights` (a .h5 path, or "last": the newest checkpoint of config.NAME under
    `model_dir`, default "runs") on the val split of the prepared dataset `data_dir` (local).

    Returns the metrics of `evaluation.evaluate_detections` plus `images_per_second`
    (decoding, inference and unmolding), `weights` (the file used), `gate` (see
    `evaluation.gate`: passed when metrics[gate_key] >= min_map) and `pictures` (paths
    relative to out_dir); the same is written to out_dir/metrics.json. `limit` evaluates the
    first images of the split only. Raises UserError on bad input, before building the model.
    """
    if gate_key not in GATE_KEYS:
        raise UserError(f"--gate-key {gate_key!r} is not a metric; use one of {list(GATE_KEYS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if config.IMAGE_RESIZE_MODE == "crop":
        raise UserError("IMAGE_RESIZE_MODE=crop takes random crops (a training mode): evaluate "
                        "with --set IMAGE_RESIZE_MODE=square (or pad64)")
    if num_pictures < 0:
        raise UserError(f"the number of pictures must be >= 0, got {num_pictures}")
    data = Path(data_dir)
    if str(data_dir).startswith("gs://") or not (data / "dataset.json").is_file():
        raise UserError(f"--data {data_dir} is not a local prepared dataset (no dataset.json): "
                        "run `mrcnn data prepare` (or download the dataset) first")
    info = read_dataset_info(str(data))
    class_names = list(info["class_names"])
    check_classes(str(data), info, config)
    gt_path = data / info.get("val_annotations", "val_annotations.json")
    gt = load_ground_truth(gt_path)
    weights_path = resolve_weights(weights, model_dir, config)
    records = examples(str(data), "val")  # UserError for an empty split
    total = int(info["splits"]["val"]["images"])
    if limit is not None:
        records, total = records.take(limit), min(limit, total)

    model = MaskRCNN("inference", config)
    report = model.load_weights(weights_path, by_name=True)
    if report.missing_in_file and progress:
        print(f"evaluate: warning: {weights_path} has no weights for "
              f"{len(report.missing_in_file)} layers (e.g. {report.missing_in_file[0]}); they "
              "keep their random initial values", file=sys.stderr)

    out = Path(out_dir)
    pictures_dir = out / PICTURES_DIR
    pictures_dir.mkdir(parents=True, exist_ok=True)
    for stale in pictures_dir.iterdir():  # a previous run's pictures would mix with these
        if PICTURE_NAME.match(stale.name):
            stale.unlink()

    def decoded() -> Iterator[tuple[int, np.ndarray]]:
        for example in records.as_numpy_iterator():
            image_id = int(example["source_id"])
            if image_id not in gt.imgs:
                raise UserError(f"val image {example['filename'].decode()} (id {image_id}) is "
                                f"not in {gt_path}: prepare the dataset again")
            yield image_id, example["image"]

    detections: dict[int, dict] = {}
    pictures: list[str] = []
    meter = Progress("evaluate", total, progress)
    shape = functools.partial(molded_shape, config=config)
    for batch in batches_by_shape(decoded(), lambda item: shape(item[1].shape),
                                  config.BATCH_SIZE):
        results = model.detect([image for _, image in batch])
        for (image_id, image), result in zip(batch, results, strict=True):
            if len(pictures) < num_pictures:
                pictures.append(_save_picture(pictures_dir, image_id, image, result, gt,
                                              class_names))
            detections[image_id] = {**result, "masks": RleMasks(result["masks"])}
        meter.update(len(detections))
    images_per_second = round(meter.rate(len(detections)), 3)

    metrics = evaluate_detections(gt, detections, class_names)
    metrics.update(images_per_second=images_per_second, weights=str(weights_path))
    verdict = gate(metrics, min_map, gate_key)
    pictures = [f"{PICTURES_DIR}/{name}" for name in pictures]
    write_reports(out, metrics, verdict, pictures)
    return {**metrics, "gate": verdict, "pictures": pictures}


def _save_picture(folder: Path, image_id: int, image: np.ndarray, detection: dict, gt,
                  class_names: list[str]) -> str:
    name = f"image-{image_id}.png"
    truth = ground_truth_instances(gt, image_id)
    save_png(folder / name, draw_predictions(image, detection, class_names, truth,
                                             min_side=PICTURE_MIN_SIDE))
    return name
