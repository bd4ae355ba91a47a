"""Why does (or doesn't) a preset learn? Trains on generated shapes and prints one JSON line per
check: loss components, proposals' recall of the ground truth (IoU >= 0.5), positive ROIs per
image, and mask targets against the ground-truth masks (an independent NumPy crop).

    python bench/diagnose.py --config configs/demo.yaml --steps 300 --every 25 \
        [--set KEY=VALUE ...] [--optimizer sgd|adam] [--lr 0.01]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from trainer import Config, MaskRCNN
from trainer.data import shapes
from trainer.data.memory import examples_dataset
from trainer.engine.training import make_optimizer
from trainer.model.image_meta import parse_image_meta


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [N, 4], b [M, 4] (y1, x1, y2, x2) -> IoU [N, M]."""
    y1 = np.maximum(a[:, None, 0], b[None, :, 0])
    x1 = np.maximum(a[:, None, 1], b[None, :, 1])
    y2 = np.minimum(a[:, None, 2], b[None, :, 2])
    x2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(y2 - y1, 0, None) * np.clip(x2 - x1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def reference_mask(full_mask: np.ndarray, roi: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour samples of `full_mask` [H, W] at crop_and_resize's grid for a normalised
    roi (sample points on the box edges, coordinates scaled by size - 1)."""
    h, w = full_mask.shape
    ys = roi[0] * (h - 1) + np.linspace(0, 1, shape[0]) * (roi[2] - roi[0]) * (h - 1)
    xs = roi[1] * (w - 1) + np.linspace(0, 1, shape[1]) * (roi[3] - roi[1]) * (w - 1)
    yi = np.clip(np.round(ys).astype(int), 0, h - 1)
    xi = np.clip(np.round(xs).astype(int), 0, w - 1)
    return full_mask[yi[:, None], xi[None, :]]


def probe(model: MaskRCNN, batch: dict, samples, config: Config) -> dict:
    """Proposals' recall, positives per image and mask-target agreement on one batch."""
    out = model.keras_model(batch, training=True)
    image_ids = parse_image_meta(batch["input_image_meta"])["image_id"].numpy()
    side = int(config.IMAGE_SHAPE[0])
    recalls, positives, agreement, top_recall = [], [], [], []
    for row, image_id in enumerate(image_ids):
        sample = samples[image_id]
        gt = sample.boxes.astype(np.float32)
        gt_norm = np.stack([gt[:, 0], gt[:, 1], gt[:, 2] - 1, gt[:, 3] - 1], 1) / (side - 1)
        proposals = out["rpn_rois"][row].numpy()
        proposals = proposals[(proposals[:, 2] > proposals[:, 0])]
        if len(gt) and len(proposals):
            iou = box_iou_np(gt_norm, proposals)
            recalls.append(float((iou.max(1) >= 0.5).mean()))
            top_recall.append(float((iou[:, :50].max(1) >= 0.5).mean()))
        class_ids = out["target_class_ids"][row].numpy()
        positives.append(int((class_ids > 0).sum()))
        rois = out["rois"][row].numpy()
        targets = out["target_mask"][row].numpy()
        for k in range(targets.shape[0]):
            if class_ids[k] <= 0:
                continue
            iou = box_iou_np(rois[k:k + 1], gt_norm)[0]
            ref = reference_mask(sample.masks[..., int(iou.argmax())], rois[k],
                                 tuple(config.MASK_SHAPE))
            agreement.append(float((ref == (targets[k] > 0.5)).mean()))
    return {"recall50": round(float(np.mean(recalls)), 3) if recalls else None,
            "recall50_top50": round(float(np.mean(top_recall)), 3) if top_recall else None,
            "positives_per_image": float(np.mean(positives)),
            "mask_target_agreement": round(float(np.mean(agreement)), 4) if agreement else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--lr", type=float, help="default: the config's LEARNING_RATE")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras  # after trainer's start-up (oneDNN on)

    keras.utils.set_random_seed(args.seed)
    config = Config.from_yaml(args.config, args.overrides)
    side = int(config.IMAGE_SHAPE[0])
    samples = [shapes.generate_sample(1000 + i, side, side) for i in range(args.images)]
    model = MaskRCNN("training", config, model_dir="/tmp/diagnose")
    lr = args.lr or config.LEARNING_RATE
    model.keras_model.compile(optimizer=make_optimizer(lr, config))
    batches = iter(examples_dataset(samples, config))
    probe_batch = next(iter(examples_dataset(samples[:config.BATCH_SIZE * 4], config,
                                             shuffle=False).unbatch().batch(8)))
    start, window = time.time(), []
    for step in range(1, args.steps + 1):
        window.append(model.keras_model.train_on_batch(next(batches), return_dict=True))
        if step % args.every == 0 or step == 1:
            losses = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
            window = []
            line = {"step": step, "seconds": round(time.time() - start, 1), **losses,
                    **probe(model, probe_batch, samples, config)}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
