"""`MaskRCNN`: matterport's Python surface over our Keras 3 graphs.

    model = MaskRCNN(mode="training", config=cfg, model_dir="runs/")
    model.load_weights("mask_rcnn_coco.h5", by_name=True, exclude=[...])
    model.keras_model                      # the keras.Model (layers, weights)
    MaskRCNN(mode="inference", ...).detect(images)  # [{rois, class_ids, scores, masks}]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import keras
import numpy as np

from trainer.config import Config
from trainer.engine import training
from trainer.engine.inference import batches_by_shape, mold_inputs, unmold_detections
from trainer.engine.strategy import distribution_strategy
from trainer.errors import UserError
from trainer.model.image_meta import parse_image_meta
from trainer.model.mask_rcnn import build_inference_model, build_training_model
from trainer.weights import checkpoints
from trainer.weights.by_name import load_weights as load_weights_by_name

MODES = ("training", "inference")


class MaskRCNN:
    """A Mask R-CNN in `mode` "training" or "inference", built from `config`.

    Both modes hold the same layers under the same names: weights trained in one load into
    the other by name (`load_weights`, `copy_weights_from`).
    """

    def __init__(self, mode: str, config: Config, model_dir: str | Path = "runs"):
        if mode not in MODES:
            raise UserError(f"mode must be 'training' or 'inference', got {mode!r}")
        self.mode = mode
        self.config = config
        self.model_dir = Path(model_dir)
        self.strategy = distribution_strategy(config)
        builder = build_training_model if mode == "training" else build_inference_model
        with self.strategy.scope():
            self.keras_model: keras.Model = builder(config)
        self.set_log_dir()

    def set_log_dir(self, model_path: str | Path | None = None) -> None:
        """Where checkpoints go, and the epoch training continues from (matterport's rule):
        a checkpoint inside a run folder continues that run at its epoch; anything else (no
        path, released weights) starts a new run folder at epoch 0 (created by train(),
        with a `_2`... suffix when a run started in the same minute has that name)."""
        self.epoch = 0
        self.resume_from: Path | None = None
        self.log_dir = checkpoints.run_folder(self.model_dir, self.config.NAME)
        if model_path is None:
            return
        model_path = Path(model_path)
        epoch = checkpoints.epoch_of(model_path)
        if epoch is not None and checkpoints.RUN_FOLDER.match(model_path.parent.name):
            self.epoch = epoch
            self.log_dir = model_path.parent
            self.resume_from = model_path

    def find_last(self) -> Path:
        """The newest checkpoint of this config's NAME across every run folder of model_dir."""
        return checkpoints.find_last_checkpoint(self.model_dir, self.config.NAME)

    # === Weights ===

    def load_weights(self, filepath: str | Path, by_name: bool = True,
                     exclude: Iterable[str] | None = None):
        """Loads a Keras-2 layout h5 (matterport's released weights, our checkpoints) by layer
        name, skipping `exclude`. Returns the weights report; raises on a shape mismatch."""
        report = load_weights_by_name(self.keras_model, filepath, by_name=by_name,
                              exclude=tuple(exclude or ()))
        self.set_log_dir(filepath)
        return report

    def train(self, train_data, val_data, learning_rate: float, epochs: int, layers: str,
              augmentation=None, custom_callbacks=None, no_augmentation_sources=None,
              verbose: int = 1, keep_last: int | None = None):
        """matterport's train(): see `trainer.engine.training.train`. keep_last (not in
        matterport): delete all but the newest `keep_last` checkpoints of the run folder."""
        return training.train(self, train_data, val_data, learning_rate, epochs, layers,
                     augmentation=augmentation, custom_callbacks=custom_callbacks,
                     no_augmentation_sources=no_augmentation_sources, verbose=verbose,
                     keep_last=keep_last)

    def copy_weights_from(self, other: MaskRCNN) -> int:
        """Copies every weight of `other` whose layer exists here by name; returns the count."""
        copied = 0
        for layer in other.keras_model.layers:
            if not layer.weights:
                continue
            try:
                target = self.keras_model.get_layer(layer.name)
            except ValueError:
                continue
            for src, dst in zip(layer.weights, target.weights, strict=True):
                dst.assign(src)
                copied += 1
        return copied

    # === Inference ===

    def detect(self, images: Sequence[np.ndarray], verbose: int = 0) -> list[dict]:
        """Detects instances in uint8 images [H, W, C] of any size and count.

        Returns, per image, matterport's dict in the image's own coordinates: rois int32
        [N, (y1, x1, y2, x2)], class_ids int32 [N], scores float32 [N], masks bool [H, W, N].
        """
        if self.mode != "inference":
            raise UserError("detect() needs a model built with mode='inference'")
        molded = [mold_inputs([image], self.config) for image in images]
        results: list[dict | None] = [None] * len(images)
        batch = self.config.BATCH_SIZE
        for chunk in batches_by_shape(range(len(images)), lambda i: molded[i][0].shape, batch):
            # A short chunk is filled up with its last image (results dropped): one batch
            # size means one traced graph, where a second costs seconds of retracing.
            filled = chunk + chunk[-1:] * (batch - len(chunk))
            metas = np.concatenate([molded[i][1] for i in filled])
            detections, _, _, masks, *_ = self.keras_model.predict_on_batch({
                "input_image": np.concatenate([molded[i][0] for i in filled]),
                "input_image_meta": metas})
            fields = parse_image_meta(metas)
            for row, index in enumerate(chunk):
                results[index] = unmold_detections(
                    np.asarray(detections[row]), np.asarray(masks[row]),
                    np.asarray(fields["original_image_shape"][row]),
                    np.asarray(fields["image_shape"][row]), np.asarray(fields["window"][row]))
                if verbose:
                    print(f"image {index}: {len(results[index]['class_ids'])} detections")
        return results
