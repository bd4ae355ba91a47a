"""Training-step throughput: seconds per step, images/second and peak memory for a config.

    python bench/train_step.py                    # demo preset + the 256 px ResNet-50 setting
    python bench/train_step.py --config configs/demo.yaml --set IMAGE_MAX_DIM=256 --steps 10
    python bench/train_step.py --precision bfloat16 --jit     # MIXED_PRECISION, JIT_COMPILE
    python bench/train_step.py --infer ...        # MaskRCNN.detect() instead, batch 1

Prints one JSON line per configuration measured. Steps are timed after a warm-up (graph
tracing), on generated shapes, with the optimizer matterport uses (SGD + momentum, global
gradient clipping). `precision` and `jit_compile` in the output say what actually ran: the
backbone's compute dtype, and whether Keras compiled the step with XLA. `peak_tensor_mb` is
the most that TensorFlow's CPU allocator held in live tensors at once (weights, optimizer
slots, activations, gradients); the rest of `peak_rss_mb` is the runtime's own (libraries,
Python, the traced graphs, free pages the allocator keeps). It is null where that allocator
keeps no statistics (TensorFlow's default one, with oneDNN off).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import trainer  # noqa: E402, F401  (before TensorFlow: its start-up turns oneDNN on)

# Issue 13's side-by-side setting on configs/demo.yaml: matterport's ResNet-50-FPN Mask R-CNN
# (BatchNorm, its head sizes and sampling) at 256 px, batch 2, 4 classes, SGD with momentum;
# bench/torchvision_step.py's defaults are the same settings for torchvision's model.
SETTING_256 = [
    "BACKBONE=resnet50", "NORM=batch", "TRAIN_BN=true", "OPTIMIZER=sgd", "LR_WARMUP_STEPS=0",
    "IMAGE_MIN_DIM=256", "IMAGE_MAX_DIM=256", "IMAGES_PER_GPU=2", "NUM_CLASSES=4",
    "TOP_DOWN_PYRAMID_SIZE=256", "FPN_CLASSIF_FC_LAYERS_SIZE=1024",
    "RPN_ANCHOR_SCALES=[32, 64, 128, 256, 512]", "RPN_TRAIN_ANCHORS_PER_IMAGE=256",
    "PRE_NMS_LIMIT=6000", "POST_NMS_ROIS_TRAINING=2000", "POST_NMS_ROIS_INFERENCE=1000",
    "TRAIN_ROIS_PER_IMAGE=128", "ROI_POSITIVE_RATIO=0.25", "PROPOSALS_INCLUDE_GT=false",
    "MAX_GT_INSTANCES=100", "MINI_MASK_SHAPE=[56, 56]", "DETECTION_MAX_INSTANCES=100",
    "DETECTION_MIN_CONFIDENCE=0.05",
]


def training_setup(config_path: str, overrides: list[str]):
    """(config, compiled keras model, an endless iterator of batches) for timing a training
    step: generated shapes, matterport's optimizer (SGD + momentum, global gradient clip)."""
    import keras

    from trainer import Config, MaskRCNN
    from trainer.data import shapes
    from trainer.data.memory import examples_dataset
    from trainer.engine.training import make_optimizer

    config = Config.from_yaml(config_path, overrides)
    side = int(config.IMAGE_SHAPE[0])
    samples = list(shapes.generate(max(8, config.BATCH_SIZE), seed=0, height=side, width=side))
    batches = iter(examples_dataset(samples, config))
    # The same initial weights and sampling every run: the number of positive ROIs (the mask
    # head's work) depends on them and moved the step time by 10 % from run to run.
    keras.utils.set_random_seed(0)
    keras_model = MaskRCNN("training", config).keras_model
    # Matterport's SGD (with float16's loss scaling when MIXED_PRECISION asks for it).
    sgd = config.replace(OPTIMIZER="sgd", LR_WARMUP_STEPS=0, LR_DECAY="none")
    jit = getattr(config, "JIT_COMPILE", False)  # an older checkout's Config has no such key
    keras_model.compile(optimizer=make_optimizer(config.LEARNING_RATE, sgd), jit_compile=jit)
    # As `trainer.engine.training.train` does: slots made here, not inside the first traced
    # step (there tf.function traces the step twice and keeps both graphs, ~15k ops each).
    keras_model.optimizer.build(keras_model.trainable_variables)
    return config, keras_model, batches


def seconds_per_step(keras_model, batches, steps: int, warmup: int) -> float:
    """Mean seconds of `steps` training steps, after `warmup` untimed ones (graph tracing).
    After the first step the heap is released as `train()`'s `ReleaseFreedHeap` does."""
    try:
        from trainer.engine.training import release_freed_heap
    except ImportError:  # an older checkout's trainer, whose train() released nothing
        release_freed_heap = None
    for i in range(warmup):
        keras_model.train_on_batch(next(batches))
        if i == 0 and release_freed_heap is not None:
            release_freed_heap()
    start = time.perf_counter()
    for _ in range(steps):
        keras_model.train_on_batch(next(batches))
    return (time.perf_counter() - start) / steps


def seconds_per_detect(config_path: str, overrides: list[str], steps: int, warmup: int):
    """(config, the inference Keras model, mean seconds of `MaskRCNN.detect()` on one image)
    after `warmup` calls."""
    from trainer import Config, MaskRCNN
    from trainer.data import shapes

    config = Config.from_yaml(config_path, [*overrides, "IMAGES_PER_GPU=1", "GPU_COUNT=1"])
    side = int(config.IMAGE_SHAPE[0])
    images = [s.image for s in shapes.generate(8, seed=0, height=side, width=side)]
    model = MaskRCNN("inference", config)
    for i in range(warmup):
        model.detect([images[i % len(images)]])
    start = time.perf_counter()
    for i in range(steps):
        model.detect([images[i % len(images)]])
    return config, model.keras_model, (time.perf_counter() - start) / steps


def measure(config_path: str, overrides: list[str], steps: int, warmup: int,
            infer: bool = False) -> dict:
    if infer:
        config, keras_model, seconds = seconds_per_detect(config_path, overrides, steps, warmup)
    else:
        config, keras_model, batches = training_setup(config_path, overrides)
        seconds = seconds_per_step(keras_model, batches, steps, warmup)
    side = int(config.IMAGE_SHAPE[0])
    return {
        "benchmark": "detect" if infer else "train_step",
        "config": config_path,
        "overrides": overrides,
        "backbone": config.BACKBONE,
        "image_size": side,
        "batch_size": config.BATCH_SIZE,
        "steps": steps,
        "precision": keras_model.get_layer("conv1").compute_dtype,
        "jit_compile": False if infer else bool(keras_model.jit_compile),
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(config.BATCH_SIZE / seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_tensor_mb": peak_tensor_mb(),
        "cpu_count": os.cpu_count(),
    }


def peak_tensor_mb() -> float | None:
    """The CPU allocator's peak bytes in live tensors since start-up, in MB (None: no stats)."""
    import tensorflow as tf

    try:
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    except ValueError:  # an allocator without statistics
        return None
    return round(peak / 2**20, 1) if peak else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("none", "float16", "bfloat16"), default="none",
                        help="MIXED_PRECISION (default: none, float32)")
    parser.add_argument("--jit", action="store_true", help="JIT_COMPILE=true: XLA train step")
    parser.add_argument("--infer", action="store_true",
                        help="time MaskRCNN.detect() on one image instead of a training step")
    parser.add_argument("--setting-256", action="store_true",
                        help="add SETTING_256 (issue 13's side-by-side setting) to --set")
    args = parser.parse_args()
    # Only what differs from the config: an older checkout (side_by_side.py --before) knows
    # neither key.
    settings = ([f"MIXED_PRECISION={args.precision}"] if args.precision != "none" else []) + \
        (["JIT_COMPILE=true"] if args.jit else [])
    if args.setting_256:
        args.overrides = [*SETTING_256, *args.overrides]
    runs = [(args.config, args.overrides)] if args.config else [
        ("configs/demo.yaml", []),
        ("configs/demo.yaml", SETTING_256),
    ]
    for path, overrides in runs:
        # One process per configuration: peak memory is per process.
        if args.config is None:
            import subprocess
            import sys

            command = [sys.executable, __file__, "--config", path, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--precision", args.precision,
                       *(["--jit"] if args.jit else []), *(["--infer"] if args.infer else [])]
            for item in overrides:
                command += ["--set", item]
            subprocess.run(command, check=True)
        else:
            print(json.dumps(measure(path, [*overrides, *settings], args.steps, args.warmup,
                                     args.infer)),
                  flush=True)


if __name__ == "__main__":
    main()
