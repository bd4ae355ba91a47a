"""The model learns: trained on two fixed shapes images, the inference model (a separate graph
sharing weights by name) finds every object with the right class and a mask IoU >= 0.8."""

import time

import keras
import numpy as np
import pytest

from trainer import Config, MaskRCNN
from trainer.data import shapes
from trainer.data.memory import examples_dataset
from trainer.engine.training import recompute_bn_statistics

MAX_STEPS = 500
CHECK_EVERY = 25


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def best_ious(sample, result) -> list[float]:
    """For each ground-truth object, its best mask IoU among detections of its class."""
    return [
        max([mask_iou(sample.masks[..., j], result["masks"][..., k])
             for k in np.flatnonzero(result["class_ids"] == sample.class_ids[j])], default=0.0)
        for j in range(len(sample.class_ids))
    ]


@pytest.mark.slow
def test_overfits_two_images():
    keras.utils.set_random_seed(0)
    config = Config.from_yaml("configs/demo.yaml", ["DETECTION_MIN_CONFIDENCE=0.7"])
    samples = [shapes.generate_sample(seed, 128, 128, 2, 3) for seed in (3, 4)]
    assert [len(s.class_ids) for s in samples] == [2, 3]
    training = MaskRCNN("training", config)
    training.keras_model.compile(optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=5.0))
    inference = MaskRCNN("inference", config)
    batches = iter(examples_dataset(samples, config))

    history, start = [], time.time()
    for step in range(CHECK_EVERY, MAX_STEPS + 1, CHECK_EVERY):
        for _ in range(CHECK_EVERY):
            losses = training.keras_model.train_on_batch(next(batches), return_dict=True)
        # TRAIN_BN: inference uses moving statistics; settle them on the final weights.
        recompute_bn_statistics(training.keras_model, [next(batches)])
        inference.copy_weights_from(training)
        ious = [best_ious(s, r) for s, r in zip(samples, inference.detect(
            [s.image for s in samples]), strict=True)]
        history.append((step, round(losses["loss"], 3), ious))
        if all(iou >= 0.8 for image in ious for iou in image):
            break
    print(f"overfit: {step} steps in {time.time() - start:.0f} s; history {history}")
    assert all(np.isfinite(v) for v in losses.values())
    assert all(iou >= 0.8 for image in ious for iou in image), history
