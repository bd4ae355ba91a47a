"""The normalisation layer a config asks for: BatchNorm (matterport's) or GroupNorm.

GroupNorm (NORM=group) normalises each sample (each ROI in the heads) over groups of channels:
no batch statistics, so it behaves the same at batch 2 as at batch 64, in training as in
inference, and padded ROI slots cannot disturb it. Detectron2's and torchvision's recipes for
training from random initialisation use it in the backbone, the FPN and the heads.
"""

from __future__ import annotations

import keras

from trainer.config import GROUP_NORM_GROUPS
from trainer.model.batch_norm import BatchNorm


def norm_layer(norm: str, train_bn: bool, name: str | None = None,
               dtype=None) -> keras.layers.Layer:
    """norm "batch" -> BatchNorm(train_bn); "group" -> GroupNormalization(32 groups).
    dtype: the Keras dtype policy; under a mixed one both normalise in float32 internally."""
    if norm == "group":
        return keras.layers.GroupNormalization(groups=GROUP_NORM_GROUPS, epsilon=1e-5,
                                               name=name, dtype=dtype)
    if norm != "batch":
        raise ValueError(f"unknown norm {norm!r}: expected batch or group")
    return BatchNorm(train_bn, name=name, dtype=dtype)
