"""`mrcnn evaluate`: a trained model on the validation shards -> metrics, report, pictures.

    evaluate(config, "runs/demo20250101T1200/mask_rcnn_demo_0004.h5", "data/", "eval/")

reads the val split's decoded examples (original images), runs the inference model on
BATCH_SIZE images at a time, scores the detections against `val_annotations.json` with
`trainer.evaluation` and writes into `out_dir`:

    metrics.json      every metric, the images/second, the weights used, the gate result
    report.md         Markdown tables of the same, the gate, links to the pictures
    pictures/*.png    a few images: predictions (left) beside the ground truth (right)

The metrics core lives in `trainer.evaluation`; this module only runs the model and files.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from trainer.checkpoints import find_last_checkpoint
from trainer.config import Config
from trainer.errors import UserError
from trainer.evaluation import (
    COCO_STAT_NAMES,
    IOU_TYPES,
    evaluate_detections,
    gate,
    ground_truth_instances,
    load_ground_truth,
    render_report,
    write_atomic,
)

LAST = "last"
PICTURES_DIR = "pictures"
PICTURE_NAME = re.compile(r"^image-\d+\.png$")
# Every metric the gate can test: bbox_mAP ... segm_mAP_large, voc_mAP50.
GATE_KEYS = tuple(f"{t}_m{n}" for t in IOU_TYPES for n in COCO_STAT_NAMES) + ("voc_mAP50",)
PROGRESS_SECONDS = 10.0


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


def _batches(items: Iterable[tuple[int, np.ndarray]], config: Config
             ) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Groups (image_id, image) into lists of up to BATCH_SIZE whose molded images share one
    shape (all of them in 'square' mode; equal padded sizes in 'pad64'/'none')."""
    from trainer.data.transforms import resize_geometry

    pending: dict[tuple, list] = {}
    for image_id, image in items:
        if config.IMAGE_RESIZE_MODE == "square":
            key: tuple = ()
        else:
            key = tuple(int(v) for v in resize_geometry(image.shape[0], image.shape[1],
                                                        config)["shape"])
        group = pending.setdefault(key, [])
        group.append((image_id, image))
        if len(group) == config.BATCH_SIZE:
            yield pending.pop(key)
    yield from pending.values()


class _Progress:
    """'evaluate: 40/500 images, 3.1 images/s' on stderr, every PROGRESS_SECONDS and at the end."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.started = self.last = time.monotonic()

    def rate(self, done: int) -> float:
        return done / max(time.monotonic() - self.started, 1e-9)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.enabled and (done >= self.total or now - self.last >= PROGRESS_SECONDS):
            self.last = now
            print(f"evaluate: {done}/{self.total} images, {self.rate(done):.2f} images/s",
                  file=sys.stderr, flush=True)


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
    from trainer.data.input import examples, read_dataset_info

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
    if config.NUM_CLASSES != len(class_names):
        raise UserError(f"NUM_CLASSES={config.NUM_CLASSES} but {data} has {len(class_names)} "
                        f"classes {class_names} (background included): set NUM_CLASSES="
                        f"{len(class_names)}")
    gt_path = data / info.get("val_annotations", "val_annotations.json")
    gt = load_ground_truth(gt_path)
    weights_path = resolve_weights(weights, model_dir, config)
    records = examples(str(data), "val")  # UserError for an empty split
    total = int(info["splits"]["val"]["images"])
    if limit is not None:
        records, total = records.take(limit), min(limit, total)

    from trainer.maskrcnn import MaskRCNN

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
    meter = _Progress(total, progress)
    for batch in _batches(decoded(), config):
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
    write_atomic(out / "metrics.json", (json.dumps({**metrics, "gate": verdict,
                                                    "pictures": pictures},
                                                   indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "report.md", _report(metrics, verdict, pictures).encode())
    return {**metrics, "gate": verdict, "pictures": pictures}


def _save_picture(folder: Path, image_id: int, image: np.ndarray, detection: dict, gt,
                  class_names: list[str]) -> str:
    from trainer.visualize import draw_predictions, save_png

    name = f"image-{image_id}.png"
    truth = ground_truth_instances(gt, image_id)
    save_png(folder / name, draw_predictions(image, detection, class_names, truth))
    return name


def _report(metrics: dict, verdict: dict, pictures: list[str]) -> str:
    lines = [render_report(metrics), "## Quality gate", ""]
    if verdict["threshold"] is None:
        lines.append(f"No threshold set: passed. ({verdict['key']} = {_number(verdict['value'])})")
    else:
        outcome = "passed" if verdict["passed"] else "FAILED"
        lines.append(f"{outcome}: {verdict['key']} = {_number(verdict['value'])}, required "
                     f">= {verdict['threshold']}")
    if pictures:
        lines += ["", "## Pictures", "", "Predictions (left) beside the ground truth (right).",
                  ""]
        lines += [f"![{Path(p).stem}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
