"""Throughput of the training input pipeline (decode, resize, augmentation, mini-masks, RPN
targets, batching) against what a training step consumes, one JSON line per result.

    .venv/bin/python bench/input_pipeline.py [--config configs/demo.yaml] [--set KEY=VALUE]

Prepares a shapes dataset of the config's image size (timed: the `data prepare` line), then
reads `--batches` batches through `training_dataset` with an augmentation spec (the
`input_pipeline` line). Compare images_per_second with bench/train_step.py's for the same
config: the pipeline must deliver several times what training consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AUGMENTATION = {"sometimes": 0.5, "then": [{"fliplr": 0.5}, {"gaussian_blur": [0.0, 2.0]}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()

    from trainer.config import Config
    from trainer.data.augment import Augmentation
    from trainer.data.input import training_dataset
    from trainer.data.prepare import prepare_dataset

    config = Config.from_yaml(args.config, args.overrides)
    side = int(config.IMAGE_SHAPE[0])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        summary = prepare_dataset("shapes", data, count=args.images, image_size=side,
                                  val_fraction=0.1, shards=4, workers=1, progress=False)
        print(json.dumps({"benchmark": "data_prepare", "images": args.images, "image_size": side,
                          "workers": 1,
                          "images_per_second": round(summary["images_per_second"], 2)}))
        dataset = training_dataset(str(data), config,
                                   augmentation=Augmentation.from_spec(AUGMENTATION))
        batches = iter(dataset)
        for _ in range(5):  # warm-up: tracing, buffers
            next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
        print(json.dumps({
            "benchmark": "input_pipeline", "config": args.config, "overrides": args.overrides,
            "image_size": side, "batch_size": config.BATCH_SIZE, "batches": args.batches,
            "augmentation": AUGMENTATION,
            "images_per_second": round(args.batches * config.BATCH_SIZE / seconds, 2),
            "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
