"""Throughput of `mrcnn evaluate`: the demo config with random weights on generated shapes,
one JSON line per run.

    .venv/bin/python bench/evaluate.py [--count 80] [--image-size 128] [--limits 8 40]
                                       [--min-confidence 0.0 ...]

Each run is a whole `evaluate()` call: model build and first-batch tracing, then decoding,
inference, unmolding, COCOeval + VOC metrics and pictures. `images_per_second` is evaluate's
own figure (first image to last detection, tracing included); `wall_seconds` covers the whole
call. The last line per confidence, `marginal`, divides the extra images of the largest limit
by its extra wall time over the smallest: the steady per-image cost, fixed costs cancelled.
`load_average` (1 min) says how busy the machine was: on 2 shared cores it moves the numbers.
--min-confidence overrides the demo's DETECTION_MIN_CONFIDENCE (a random model's detections
pass 0.5 or not depending on its seed and the image size; `detections` shows which).
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import Config  # noqa: E402
from trainer.evaluation.run import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=80, help="shapes images to generate")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--limits", type=int, nargs="+", default=[8, 40],
                        help="val images per run")
    parser.add_argument("--min-confidence", type=float, nargs="+", default=[None],
                        help="DETECTION_MIN_CONFIDENCE values (default: the demo's)")
    args = parser.parse_args()

    import keras

    from trainer.data.prepare import prepare_dataset
    from trainer.engine.maskrcnn import MaskRCNN
    from trainer.weights.by_name import save_weights

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        tmp = Path(tmp)
        summary = prepare_dataset("shapes", tmp / "data", count=args.count,
                                  image_size=args.image_size, val_fraction=0.5, shards=1,
                                  progress=False)
        val_images = summary["splits"]["val"]["images"]
        keras.utils.set_random_seed(0)
        base = Config.from_yaml(ROOT / "configs" / "demo.yaml")
        save_weights(MaskRCNN("training", base).keras_model, tmp / "random.h5")
        for confidence in args.min_confidence:
            config = base if confidence is None else base.replace(
                DETECTION_MIN_CONFIDENCE=confidence)
            runs = []
            for limit in args.limits:
                started = time.monotonic()
                result = evaluate(config, tmp / "random.h5", tmp / "data", tmp / "out",
                                  limit=limit, num_pictures=2, progress=False)
                wall = time.monotonic() - started
                runs.append((result["num_images"], wall))
                print(json.dumps({
                    "bench": "evaluate", "config": "demo", "backbone": config.BACKBONE,
                    "image_size": args.image_size, "batch_size": config.BATCH_SIZE,
                    "detection_min_confidence": config.DETECTION_MIN_CONFIDENCE,
                    "val_images": val_images,
                    "images": result["num_images"], "detections": result["num_detections"],
                    "images_per_second": result["images_per_second"],
                    "wall_seconds": round(wall, 2),
                    "load_average": round(os.getloadavg()[0], 2),
                }), flush=True)
            (small, small_wall), (large, large_wall) = min(runs), max(runs)
            if large > small and large_wall > small_wall:
                print(json.dumps({
                    "bench": "evaluate", "config": "demo", "marginal": True,
                    "detection_min_confidence": config.DETECTION_MIN_CONFIDENCE,
                    "images": large - small,
                    "images_per_second": round((large - small) / (large_wall - small_wall), 3),
                }), flush=True)


if __name__ == "__main__":
    main()
