"""The inference model's time against the number of detections, with the mask head on every
DETECTION_MAX_INSTANCES slot (MASK_HEAD_ROIS=static) or on the detections found (dynamic).

    python bench/detect_slots.py                  # the 256 px setting, 100 and 10 detections
    python bench/detect_slots.py --detections 100 10 3 --steps 8

A randomly initialised model scores about every box alike, so it fills all the slots; a
trained one fills few. The detection count is set here by the score threshold: the model
(seeded) scores one image once, and DETECTION_MIN_CONFIDENCE is put just under its n-th best
score. Each configuration runs in this process with the same weights and image; prints one JSON
line per (detections, MASK_HEAD_ROIS): milliseconds per `predict_on_batch` of the molded image.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import trainer  # noqa: E402, F401  (before TensorFlow: its start-up turns oneDNN on)


def main() -> None:
    import keras
    import numpy as np
    from train_step import SETTING_256  # bench/, beside this script

    from trainer import Config, MaskRCNN
    from trainer.data import shapes
    from trainer.engine.inference import mold_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, nargs="+", default=[100, 10])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    config = Config.from_yaml("configs/demo.yaml",
                              [*SETTING_256, "IMAGES_PER_GPU=1", "GPU_COUNT=1"])
    [sample] = shapes.generate(1, seed=0, height=256, width=256)
    inputs = list(mold_inputs([sample.image], config))
    keras.utils.set_random_seed(0)
    probe = MaskRCNN("inference", config.replace(MASK_HEAD_ROIS="static",
                                                 DETECTION_MIN_CONFIDENCE=0.0))
    detections = np.asarray(probe.keras_model.predict_on_batch(inputs)[0][0])
    scores = np.sort(detections[detections[:, 4] > 0, 5])[::-1]
    for wanted in args.detections:
        threshold = float(scores[min(wanted, len(scores)) - 1]) * (1 - 1e-6)
        for rois in ("static", "dynamic"):
            model = MaskRCNN("inference", config.replace(
                MASK_HEAD_ROIS=rois, DETECTION_MIN_CONFIDENCE=threshold))
            model.copy_weights_from(probe)
            for _ in range(2):  # tracing
                model.keras_model.predict_on_batch(inputs)
            start = time.perf_counter()
            for _ in range(args.steps):
                found = model.keras_model.predict_on_batch(inputs)[0]
            seconds = (time.perf_counter() - start) / args.steps
            print(json.dumps({"benchmark": "detect_slots", "mask_head_rois": rois,
                              "detections": int(np.sum(np.asarray(found)[0, :, 4] > 0)),
                              "ms_per_image": round(seconds * 1000, 1)}), flush=True)


if __name__ == "__main__":
    main()
