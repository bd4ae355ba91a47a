"""BatchNorm whose statistics are frozen unless TRAIN_BN says otherwise.

Matterport calls every BatchNormalization with `training=TRAIN_BN`. A functional Keras 3 model
overrides a `training` argument given at build time with the one the model is called with, so
the choice is kept on the layer instead: with TRAIN_BN false the layers always normalise with
their moving statistics; with TRAIN_BN true they normalise with the batch's statistics while
the model trains and with the moving statistics at inference.

A layer frozen by `train(layers=...)` keeps TRAIN_BN's meaning too (matterport's Keras 2 did:
`trainable` froze gamma and beta, not the statistics). Keras 3 alone would switch a frozen
BatchNormalization to its moving statistics, so the `heads` stage on a randomly initialised
backbone would run the heads on features normalised with mean 0, variance 1: nothing like what
the backbone produces. Here a frozen layer normalises with the batch's statistics and its moving
statistics follow them (gamma and beta stay frozen), so inference sees what training saw.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mrcnn")
class BatchNorm(keras.layers.BatchNormalization):
    """keras BatchNormalization with `train_bn`: False freezes the statistics (the default)."""

    def __init__(self, train_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.train_bn = bool(train_bn)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.train_bn):
            return super().call(inputs, training=False, mask=mask)
        if mask is None and self._fusable(inputs.shape.rank):
            return self._fused_batch_statistics(inputs)
        if self.trainable:
            return super().call(inputs, training=True, mask=mask)
        return self._normalise_with_batch_statistics(inputs, None)

    def _fusable(self, rank: int) -> bool:
        """Channels last, gamma and beta, no renorm or cross-replica statistics, and an
        epsilon the fused op accepts as given (it raises smaller ones to 1.001e-5)."""
        return (self.axis in (-1, rank - 1) and self.center and self.scale
                and not self.renorm and not self.synchronized and self.epsilon >= 1.001e-5)

    def _fused_batch_statistics(self, inputs, present=None):
        """Batch statistics as one FusedBatchNormV3 op (and one gradient op) instead of
        Keras's twenty-odd elementwise ops and reductions, each a pass over the activation:
        the same outputs, gradients and moving-statistics update (Keras 3 moves the moving
        variance towards the biased batch variance; the fused op returns the unbiased one,
        which is scaled back). A frozen layer (gamma and beta not trainable) gets no gradients
        for them: the tape does not watch them. present: a bool scalar, false to leave the
        moving statistics as they are (the inputs hold nothing to learn them from)."""
        inputs = tf.cast(inputs, tf.float32)
        channels = inputs.shape[-1]
        flat = tf.reshape(inputs, [1, -1, 1, channels])  # any rank: statistics over all but C
        outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            flat, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
            epsilon=self.epsilon, data_format="NHWC", is_training=True)
        count = tf.cast(tf.shape(flat)[1], tf.float32)
        # One element per channel: the unbiased variance is undefined, the biased one 0.
        variance = tf.where(count > 1.0, unbiased * (count - 1.0) / count, 0.0)
        if present is None:
            self._move_statistics(mean, variance, self.momentum)
        else:
            self._move_statistics(tf.where(present, mean, self.moving_mean),
                                  tf.where(present, variance, self.moving_variance),
                                  tf.where(present, self.momentum, 1.0))
        return tf.cast(tf.reshape(outputs, tf.shape(inputs)), self.compute_dtype)

    def _normalise_with_batch_statistics(self, inputs, weights):
        """Batch statistics (over the `weights` [..., 1] > 0 elements when given); the moving
        statistics move towards them, unless no element takes part."""
        inputs = tf.cast(inputs, tf.float32)
        axes = list(range(inputs.shape.rank - 1))
        if weights is None:
            mean, variance = tf.nn.moments(inputs, axes)
            count = tf.constant(1.0)
        else:  # divide_no_nan: no ROI at all must not put NaN into the gradients
            weights = weights + tf.zeros_like(inputs)
            total = tf.reduce_sum(weights, axes)
            mean = tf.math.divide_no_nan(tf.reduce_sum(weights * inputs, axes), total)
            variance = tf.math.divide_no_nan(
                tf.reduce_sum(weights * tf.square(inputs - mean), axes), total)
            count = tf.reduce_max(total)
        present = count > 0.0
        mean = tf.where(present, mean, self.moving_mean)
        variance = tf.where(present, variance, self.moving_variance)
        self._move_statistics(mean, variance, tf.where(present, self.momentum, 1.0))
        outputs = tf.nn.batch_normalization(inputs, mean, variance, self.beta, self.gamma,
                                            self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def _move_statistics(self, mean, variance, momentum) -> None:
        """Moving statistics <- momentum x themselves + (1 - momentum) x the batch's."""
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))

    def get_config(self) -> dict:
        return {**super().get_config(), "train_bn": self.train_bn}


@keras.saving.register_keras_serializable(package="mrcnn")
class RoiBatchNorm(BatchNorm):
    """BatchNorm over ROIs whose statistics come from the real ROIs only.

    Inputs: [x float32 [B, R, ..., C], valid bool [B, R]]. The training graph runs the mask
    head on the positive-ROI slots only; early in training most of them are zero padding, and
    statistics over all slots would be mostly padding's. Matterport ran the head on every ROI,
    sampled or padding; here padding slots never enter the statistics (they are normalised
    with the real ROIs' statistics, and their outputs are never used). Same weights as a
    BatchNormalization (gamma, beta, moving_mean, moving_variance).

    padded=False: the rows hold real ROIs only, or (no ROI found) a single row that is not one:
    what `PositiveRois` gives the dynamic mask head. The statistics are then the fused op's over
    all rows (the moving ones stay put without an ROI), instead of a weighted mean and variance
    whose elementwise steps held four more copies of each mask-head activation for the backward
    pass (~160 MB at the 256 px setting).
    """

    def __init__(self, train_bn: bool = False, padded: bool = True, **kwargs):
        super().__init__(train_bn, **kwargs)
        self.padded = bool(padded)

    def build(self, input_shape):
        super().build(input_shape[0])
        self.input_spec = None  # two inputs; BatchNormalization's spec describes one

    def call(self, inputs, training=None, mask=None):
        x, valid = inputs
        if not (training and self.train_bn):
            return super().call(x, training=False)
        if not self.padded and self._fusable(x.shape.rank):
            return self._fused_batch_statistics(x, present=tf.reduce_any(valid))
        weights = tf.cast(valid, tf.float32)
        weights = tf.reshape(weights, tf.concat([tf.shape(weights), tf.ones(
            [x.shape.rank - 2], tf.int32)], axis=0))
        weights = tf.broadcast_to(weights, tf.concat([tf.shape(x)[:-1], [1]], axis=0))
        return self._normalise_with_batch_statistics(x, weights)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self) -> dict:
        return {**super().get_config(), "padded": self.padded}
