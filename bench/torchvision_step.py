"""The peer: torchvision's Mask R-CNN (ResNet-50-FPN) timed on the settings bench/train_step.py
measures ours with, for side-by-side ratios. Runs in its own environment (torch and
torchvision are not this project's dependencies; nothing imports this file):

    python3.11 -m venv /work/tvenv && /work/tvenv/bin/pip install torch torchvision numpy pillow
    /work/tvenv/bin/python bench/torchvision_step.py --mode train --size 256
    /work/tvenv/bin/python bench/torchvision_step.py --mode infer --size 256

Prints one JSON line like bench/train_step.py's. Same images (this project's generated shapes,
1-3 objects each, loaded from trainer/data/shapes.py by path: it needs only NumPy and PIL),
random initialisation, live BatchNorm everywhere (torchvision's default without pretrained
weights), all layers trainable, SGD with momentum 0.9 and weight decay 1e-4, gradient norm
clipped at 5, torch.set_num_threads(--threads).

Settings (matterport's names -> torchvision's arguments): IMAGE_MIN/MAX_DIM -> min_size /
max_size; RPN_TRAIN_ANCHORS_PER_IMAGE -> rpn_batch_size_per_image; PRE_NMS_LIMIT ->
rpn_pre_nms_top_n_train (torchvision applies it per FPN level, matterport over all levels);
POST_NMS_ROIS_TRAINING -> rpn_post_nms_top_n_train; TRAIN_ROIS_PER_IMAGE and
ROI_POSITIVE_RATIO -> box_batch_size_per_image, box_positive_fraction; inference:
POST_NMS_ROIS_INFERENCE -> rpn_post_nms_top_n_test, DETECTION_MAX_INSTANCES ->
box_detections_per_img, DETECTION_MIN_CONFIDENCE -> box_score_thresh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import time


def load_shapes():
    path = pathlib.Path(__file__).resolve().parents[1] / "trainer" / "data" / "shapes.py"
    spec = importlib.util.spec_from_file_location("shapes_by_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def samples_as_tensors(count: int, side: int):
    import numpy as np
    import torch

    shapes = load_shapes()
    images, targets = [], []
    for sample in shapes.generate(count, seed=0, height=side, width=side):
        images.append(torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
                      .float() / 255.0)
        boxes = torch.from_numpy(sample.boxes.astype("float32"))[:, [1, 0, 3, 2]]  # x1y1x2y2
        targets.append({
            "boxes": boxes,
            "labels": torch.from_numpy(sample.class_ids.astype("int64")),
            "masks": torch.from_numpy(np.transpose(sample.masks, (2, 0, 1)).astype("uint8")),
        })
    return images, targets


def build(args):
    import torchvision

    return torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=args.num_classes,
        trainable_backbone_layers=5, min_size=args.size, max_size=args.size,
        rpn_batch_size_per_image=args.rpn_anchors, rpn_pre_nms_top_n_train=args.pre_nms,
        rpn_post_nms_top_n_train=args.post_nms_train, rpn_pre_nms_top_n_test=args.pre_nms,
        rpn_post_nms_top_n_test=args.post_nms_infer, box_batch_size_per_image=args.rois,
        box_positive_fraction=args.positive_ratio, box_detections_per_img=args.detections,
        box_score_thresh=args.min_confidence)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--rpn-anchors", type=int, default=256)
    parser.add_argument("--pre-nms", type=int, default=6000)
    parser.add_argument("--post-nms-train", type=int, default=2000)
    parser.add_argument("--post-nms-infer", type=int, default=1000)
    parser.add_argument("--rois", type=int, default=128)
    parser.add_argument("--positive-ratio", type=float, default=0.25)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--min-confidence", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(args)
    images, targets = samples_as_tensors(max(8, args.batch), args.size)
    times = []
    if args.mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9,
                                    weight_decay=1e-4)
        for step in range(args.warmup + args.steps):
            start = (step * args.batch) % len(images)
            index = [(start + i) % len(images) for i in range(args.batch)]
            begin = time.perf_counter()
            losses = model([images[i] for i in index], [targets[i] for i in index])
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - begin)
        batch = args.batch
    else:
        model.eval()
        batch = 1
        with torch.no_grad():
            for step in range(args.warmup + args.steps):
                begin = time.perf_counter()
                model([images[step % len(images)]])
                if step >= args.warmup:
                    times.append(time.perf_counter() - begin)
    seconds = statistics.mean(times)
    print(json.dumps({
        "benchmark": f"torchvision_{args.mode}",
        "torch": torch.__version__,
        "image_size": args.size,
        "batch_size": batch,
        "steps": args.steps,
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(batch / seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }), flush=True)


if __name__ == "__main__":
    main()
