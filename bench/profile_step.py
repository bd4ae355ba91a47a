"""Where a training step's time goes: a TensorFlow profiler trace summarised by stage, the
step's FLOPs counted analytically, and the model FLOP utilisation against this machine's
measured fp32 matmul peak.

    python bench/profile_step.py                                   # demo preset
    python bench/profile_step.py --set BACKBONE=resnet50 --set IMAGE_MAX_DIM=256 ...
    python bench/profile_step.py --top 30 ...     # and the 30 costliest ops by name

Prints one JSON line: seconds per step (timed outside the profiler), per stage the share of
the CPU time the step's ops took (forward and backward apart: backward ops are the ones
TensorFlow names `gradient_tape/...`), the FLOPs of a step, the measured matmul peak, and the
utilisation. Stages come from the layer each op belongs to (its name scope):

    backbone   conv1, res*/bn* and the ResNet's unnamed activations and adds
    fpn        fpn_*           rpn_head   rpn_model, rpn_class/bbox concatenations
    proposals  ROI (top-k, box decoding, NMS), anchors
    targets    proposal_targets, norm_gt_boxes, positive_rois/slots (matching, sampling, masks)
    roi_align  roi_align_classifier, roi_align_mask
    heads      mrcnn_* (classifier and mask heads)
    losses     the five losses and the L2 term (ops outside the model's scope in the step)
    optimizer  the optimizer's update and gradient clipping
FLOPs are 2 per multiply-add of convolutions and dense layers (which hold nearly all of
them), forward plus backward (twice the forward: input and weight gradients), useful work
only: the classifier head over TRAIN_ROIS_PER_IMAGE sampled ROIs, the mask head over the
positive ROIs the targets layer actually found (padded slots do not count), the RPN head's
backward over the pixels under the anchors its losses sampled (elsewhere its output gradient
is zero, and trainer/model/conv.py skips those pixels).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import resource
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import trainer  # noqa: E402, F401  (before TensorFlow: its start-up turns oneDNN on)

STAGES = ("backbone", "fpn", "rpn_head", "proposals", "targets", "roi_align", "heads",
          "losses", "optimizer", "other")
LAYER_STAGES = [
    (re.compile(r"(conv1|bn_conv1|res\d.*|bn\d.*|activation(_\d+)?|add(_\d+)?|zero_padding2d"
                r"|max_pooling2d)$"), "backbone"),
    (re.compile(r"fpn_.*"), "fpn"),
    (re.compile(r"rpn_.*"), "rpn_head"),
    (re.compile(r"(ROI|anchors)$"), "proposals"),
    (re.compile(r"(proposal_targets|norm_gt_boxes|positive_rois|positive_slots)$"), "targets"),
    (re.compile(r"roi_align_.*"), "roi_align"),
    (re.compile(r"(mrcnn_.*|pool_squeeze)$"), "heads"),
]
MODEL_SCOPE = re.compile(r"^(?:gradient_tape/)?mask_rcnn(?:_\d+)?/([^/:]+)")
LOSS_OP = re.compile(r"(loss|Loss|weight_decay|Square|Mean|SparseSoftmax|Sigmoid)")
OPTIMIZER_OP = re.compile(r"(SGD|Adam|adam|sgd|ResourceApply|AssignSubVariable|"
                          r"AssignAddVariable|global_norm|clip|Sqrt)")


def stage_of(op_name: str) -> str:
    found = MODEL_SCOPE.match(op_name)
    if found:
        scope = found.group(1)
        unsuffixed = re.sub(r"_\d+$", "", scope)  # Keras numbers a layer's scope per call
        for pattern, stage in LAYER_STAGES:
            if pattern.match(scope) or pattern.match(unsuffixed):
                return stage
        return "other"
    if OPTIMIZER_OP.search(op_name):
        return "optimizer"
    if LOSS_OP.search(op_name):
        return "losses"
    return "other"


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of TensorFlow's matmul on this machine (2 n^3 FLOPs per product)."""
    import tensorflow as tf

    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def chain(x):
        for _ in range(repeats):
            x = tf.matmul(x, b) * 1e-3
        return x

    chain(a).numpy()  # trace and warm up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        chain(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best / 1e9


def conv_macs(layer, inputs_shape, outputs_shape) -> int:
    """Multiply-adds of one call of a Conv2D / Conv2DTranspose / Dense on one sample."""
    import keras

    kernel = layer.kernel.shape
    if isinstance(layer, keras.layers.Dense):
        return int(kernel[0] * kernel[1])
    if isinstance(layer, keras.layers.Conv2DTranspose):
        # every input pixel scatters kh*kw*cout values from cin inputs
        return int(inputs_shape[1] * inputs_shape[2] * kernel[0] * kernel[1] * kernel[2]
                   * kernel[3])
    return int(outputs_shape[1] * outputs_shape[2] * kernel[0] * kernel[1] * kernel[2]
               * kernel[3])


def step_flops(keras_model, config, positives_per_image: float,
               rpn_live_pixels_per_image: float) -> dict:
    """Forward + backward FLOPs of one training step, by stage (see the module docstring)."""
    import keras

    forward = collections.Counter()
    for layer in keras_model.layers:
        wrapped = layer.layer if isinstance(layer, keras.layers.TimeDistributed) else layer
        if isinstance(layer, keras.Model) or not hasattr(wrapped, "kernel"):
            continue  # rpn_model: counted per FPN level below
        stage = stage_of(f"mask_rcnn/{layer.name}")
        if isinstance(layer, keras.layers.TimeDistributed):  # [batch, rois, ...] per ROI
            per_roi = conv_macs(wrapped, layer.input.shape[1:], layer.output.shape[1:])
            rois = positives_per_image if layer.name.startswith("mrcnn_mask") else \
                config.TRAIN_ROIS_PER_IMAGE
            forward[stage] += per_roi * rois * config.BATCH_SIZE
        else:
            forward[stage] += conv_macs(wrapped, layer.input.shape, layer.output.shape) \
                * config.BATCH_SIZE
    # 2 FLOPs per multiply-add; backward (input and weight gradients) is twice the forward,
    # the RPN head's over the live pixels only.
    by_stage = {stage: 2 * 3 * macs for stage, macs in forward.items()}
    rpn_per_pixel, rpn_pixels = rpn_head_macs(keras_model, config)
    by_stage["rpn_head"] = 2 * rpn_per_pixel * config.BATCH_SIZE * (
        rpn_pixels + 2 * rpn_live_pixels_per_image)
    return {"total": sum(by_stage.values()), "by_stage": by_stage}


def rpn_head_macs(keras_model, config) -> tuple[int, int]:
    """The RPN head runs on every FPN level P2..P6: (its multiply-adds per pixel, the pixels of
    one image's levels)."""
    rpn = keras_model.get_layer("rpn_model")
    side = int(config.IMAGE_SHAPE[0])
    pixels = sum((side // stride) ** 2 for stride in config.BACKBONE_STRIDES)
    per_pixel = 0
    for layer in rpn.layers:
        if hasattr(layer, "kernel"):
            k = layer.kernel.shape
            per_pixel += int(k[0] * k[1] * k[2] * k[3])
    return per_pixel, pixels


def profile(config_path: str, overrides: list[str], steps: int, warmup: int,
            top: int = 0) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    from train_step import seconds_per_step, training_setup  # bench/, beside this script

    config, keras_model, batches = training_setup(config_path, overrides)
    side = int(config.IMAGE_SHAPE[0])
    seconds = seconds_per_step(keras_model, batches, steps, warmup)  # outside the profiler

    # Positive ROIs the targets layer finds on these images (the mask head's useful work).
    batch = next(batches)
    targets = keras.Model(keras_model.inputs,
                          keras_model.get_layer("proposal_targets").output)
    target_class_ids = np.asarray(targets.predict_on_batch(batch)[1])  # [B, ROIs]
    positives = float(np.mean(np.sum(target_class_ids > 0, axis=-1)))
    # Pixels under the anchors the RPN losses read: anchors are in (level, row, column, ratio)
    # order, ANCHORS_PER_LOCATION per pixel.
    rpn_match = np.asarray(batch["input_rpn_match"]).reshape(config.BATCH_SIZE, -1)
    rpn_live = float(np.mean([
        np.unique(np.flatnonzero(match) // config.ANCHORS_PER_LOCATION).size
        for match in rpn_match]))

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            keras_model.train_on_batch(next(batches))
        tf.profiler.experimental.stop()
        [path] = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as handle:
            space.ParseFromString(handle.read())
    cpu = collections.Counter()
    by_op = collections.Counter()
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                if ":" not in name or "::" in name:  # executor events enclose the ops
                    continue
                direction = "backward" if name.startswith("gradient_tape/") else "forward"
                cpu[(stage_of(name), direction)] += event.duration_ps
                by_op[name.split(":")[0]] += event.duration_ps
    total_cpu = sum(cpu.values()) or 1
    shares = {stage: {d: round(cpu[(stage, d)] / total_cpu, 4) for d in ("forward", "backward")}
              for stage in STAGES}

    flops = step_flops(keras_model, config, positives, rpn_live)
    peak = matmul_peak_gflops()
    achieved = flops["total"] / seconds / 1e9
    return {
        "benchmark": "profile_step",
        "config": config_path,
        "overrides": overrides,
        "backbone": config.BACKBONE,
        "image_size": side,
        "batch_size": config.BATCH_SIZE,
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(config.BATCH_SIZE / seconds, 3),
        "cpu_seconds_per_step_in_ops": round(total_cpu / 1e12 / steps, 3),
        "cpu_share_by_stage": shares,
        "top_ops": {name: round(ps / total_cpu, 4) for name, ps in by_op.most_common(top)},
        "positive_rois_per_image": positives,
        "rpn_live_pixels_per_image": rpn_live,
        "gflops_per_step": round(flops["total"] / 1e9, 2),
        "gflops_per_step_by_stage": {k: round(v / 1e9, 2) for k, v in flops["by_stage"].items()},
        "matmul_peak_gflops": round(peak, 1),
        "achieved_gflops": round(achieved, 1),
        "model_flop_utilisation": round(achieved / peak, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=0,
                        help="also list the N ops that took the most CPU time (share of it)")
    args = parser.parse_args()
    print(json.dumps(profile(args.config, args.overrides, args.steps, args.warmup,
                             args.top)), flush=True)


if __name__ == "__main__":
    main()
