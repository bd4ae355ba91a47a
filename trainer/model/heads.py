"""The second stage: the box classifier/regressor head and the mask head (matterport's names).

Both run on ROIs pooled from P2..P5. Their "fully connected" layers are convolutions wrapped in
TimeDistributed (one application per ROI), so weights carry over from matterport's h5 as is.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from trainer.model.batch_norm import RoiBatchNorm
from trainer.model.normalization import norm_layer
from trainer.model.roi_align import PyramidROIAlign
from trainer.model.time_distributed import TimeDistributed


def classifier_head(rois, feature_maps, image_meta, *, pool_size: int, num_classes: int,
                    train_bn: bool, fc_size: int = 1024, norm: str = "batch", dtype=None,
                    sampler: str = "gather"):
    """rois float32 [B, R, 4] normalised -> (class logits [B, R, num_classes],
    class probabilities [B, R, num_classes], box deltas [B, R, num_classes, 4]).
    norm: "batch" (matterport) or "group" (GroupNorm in the `mrcnn_class_bn*` slots).
    dtype: the Keras dtype policy of the convolutions and dense layers (None: the global one);
    the ROI pooling, the probabilities and the box deltas stay float32 (logits are in dtype's
    compute dtype: the loss casts them). sampler: the ROIAlign's (see `roi_align`)."""
    num_rois = rois.shape[1]
    x = PyramidROIAlign((pool_size, pool_size), sampler=sampler, name="roi_align_classifier")(
        [rois, image_meta, *feature_maps])
    x = TimeDistributed(layers.Conv2D(fc_size, pool_size, padding="valid", dtype=dtype),
                        name="mrcnn_class_conv1", dtype=dtype)(x)
    x = TimeDistributed(norm_layer(norm, train_bn, dtype=dtype), name="mrcnn_class_bn1",
                        dtype=dtype)(x)
    x = layers.Activation("relu", dtype=dtype)(x)
    x = TimeDistributed(layers.Conv2D(fc_size, 1, dtype=dtype), name="mrcnn_class_conv2",
                        dtype=dtype)(x)
    x = TimeDistributed(norm_layer(norm, train_bn, dtype=dtype), name="mrcnn_class_bn2",
                        dtype=dtype)(x)
    x = layers.Activation("relu", dtype=dtype)(x)
    shared = layers.Reshape((num_rois, fc_size), name="pool_squeeze", dtype=dtype)(x)

    logits = TimeDistributed(layers.Dense(num_classes, dtype=dtype), name="mrcnn_class_logits",
                             dtype=dtype)(shared)
    probs = layers.Activation("softmax", name="mrcnn_class", dtype="float32")(logits)
    x = TimeDistributed(layers.Dense(num_classes * 4, dtype=dtype), name="mrcnn_bbox_fc",
                        dtype=dtype)(shared)
    deltas = layers.Reshape((num_rois, num_classes, 4), name="mrcnn_bbox", dtype="float32")(x)
    return logits, probs, deltas


def mask_head(rois, feature_maps, image_meta, *, pool_size: int, num_classes: int,
              train_bn: bool, roi_valid=None, norm: str = "batch", dtype=None,
              image_indices=None, sampler: str = "gather"):
    """rois float32 [B, R, 4] normalised -> mask logits [B, R, 2 * pool, 2 * pool, num_classes].

    roi_valid: bool [B, R], the slots holding real ROIs (default: non-zero boxes). With
    BatchNorm, only those enter the statistics (see `RoiBatchNorm`); norm "group" normalises
    each ROI by itself (GroupNorm in the `mrcnn_mask_bn*` slots).
    `mrcnn_mask` has no activation here (matterport's has a sigmoid): the loss works on logits,
    which is exact where the sigmoid saturates; inference applies the sigmoid after it.
    dtype: the Keras dtype policy of the convolutions (None: the global one); the ROI pooling
    stays float32, the logits come out in dtype's compute dtype.
    image_indices: int32 [1, N] with rois [1, N, 4] (`PositiveRois`' outputs): the image of
    the batch each ROI crops from; those rows are real ROIs (or one row, none found), so the
    BatchNorms take their fused path (`RoiBatchNorm(padded=False)`).
    sampler: the ROIAlign's (see `roi_align`).
    """
    if roi_valid is None:
        roi_valid = layers.Lambda(lambda r: r[..., 2] > r[..., 0], name="mask_roi_valid")(rois)
    by_image = [] if image_indices is None else [image_indices]
    x = PyramidROIAlign((pool_size, pool_size), image_indices=image_indices is not None,
                        sampler=sampler, name="roi_align_mask")(
        [rois, *by_image, image_meta, *feature_maps])
    for i in range(1, 5):
        x = TimeDistributed(layers.Conv2D(256, 3, padding="same", dtype=dtype),
                            name=f"mrcnn_mask_conv{i}", dtype=dtype)(x)
        if norm == "group":
            x = TimeDistributed(norm_layer(norm, train_bn, dtype=dtype),
                                name=f"mrcnn_mask_bn{i}", dtype=dtype)(x)
        else:
            x = RoiBatchNorm(train_bn, padded=image_indices is None, name=f"mrcnn_mask_bn{i}",
                             dtype=dtype)([x, roi_valid])
        x = layers.Activation("relu", dtype=dtype)(x)
    x = TimeDistributed(layers.Conv2DTranspose(256, 2, strides=2, activation="relu",
                                               dtype=dtype),
                        name="mrcnn_mask_deconv", dtype=dtype)(x)
    return TimeDistributed(layers.Conv2D(num_classes, 1, dtype=dtype), name="mrcnn_mask",
                           dtype=dtype)(x)


@keras.saving.register_keras_serializable(package="mrcnn")
class PositiveRois(keras.layers.Layer):
    """The positive ROIs of a batch in one row, padding slots left out (no weights).

    Inputs: [rois float32 [B, T, 4], valid bool [B, T]]; the first `slots` columns are the
    positive slots. Outputs: rois [1, N, 4], their image indices int32 [1, N] and validity
    bool [1, N], and their slots int32 [N, (image, slot)] for `ToSlots`. N is the number of
    positives found, known at run time; when none is found, N is 1: slot (0, 0), not valid (a
    convolution over an empty batch fails on CPU). The mask head then runs on real ROIs only.
    """

    def __init__(self, slots: int, **kwargs):
        super().__init__(**kwargs)
        self.slots = int(slots)

    def call(self, inputs):
        rois, valid = inputs
        valid = valid[:, : self.slots]
        where = tf.cast(tf.where(valid), tf.int32)  # [N, 2], row-major
        where = tf.cond(tf.shape(where)[0] > 0, lambda: where,
                        lambda: tf.zeros([1, 2], tf.int32))
        picked = tf.gather_nd(rois[:, : self.slots], where)
        return [picked[None], where[None, :, 0], tf.gather_nd(valid, where)[None], where]

    def compute_output_shape(self, input_shape):
        return [(1, None, 4), (1, None), (1, None), (None, 2)]

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape(None)
        dtypes = ["float32", "int32", "bool", "int32"]
        return [keras.KerasTensor(s, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]

    def get_config(self) -> dict:
        return {**super().get_config(), "slots": self.slots}


@keras.saving.register_keras_serializable(package="mrcnn")
class ToSlots(keras.layers.Layer):
    """Puts `PositiveRois`' per-ROI results back in their slots, zeros elsewhere (no weights).

    Inputs: [values [1, N, ...], slots int32 [N, 2], like [B, T, ...]: any tensor whose first
    axis gives B]. Output: [B, slots, ...].
    """

    def __init__(self, slots: int, **kwargs):
        super().__init__(**kwargs)
        self.slots = int(slots)

    def call(self, inputs):
        values, where, like = inputs
        shape = tf.concat([tf.shape(like)[:1], [self.slots], tf.shape(values)[2:]], axis=0)
        return tf.scatter_nd(where, values[0], shape)

    def compute_output_shape(self, input_shape):
        return (input_shape[2][0], self.slots, *input_shape[0][2:])

    def get_config(self) -> dict:
        return {**super().get_config(), "slots": self.slots}
