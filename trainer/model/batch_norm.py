"""BatchNorm whose statistics are frozen unless TRAIN_BN says otherwise.

Matterport calls every BatchNormalization with `training=TRAIN_BN`. A functional Keras 3 model
overrides a `training` argument given at build time with the one the model is called with, so
the choice is kept on the layer instead: frozen layers always normalise with their moving
statistics, trainable ones follow the model's training flag (and infer with moving statistics).
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="mrcnn")
class BatchNorm(keras.layers.BatchNormalization):
    """keras BatchNormalization with `train_bn`: False freezes the statistics (the default)."""

    def __init__(self, train_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.train_bn = bool(train_bn)

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=bool(training) and self.train_bn, mask=mask)

    def get_config(self) -> dict:
        return {**super().get_config(), "train_bn": self.train_bn}
