"""The second stage: the box classifier/regressor head and the mask head (matterport's names).

Both run on ROIs pooled from P2..P5. Their "fully connected" layers are convolutions wrapped in
TimeDistributed (one application per ROI), so weights carry over from matterport's h5 as is.
"""

from __future__ import annotations

from keras import layers

from trainer.model.batch_norm import RoiBatchNorm
from trainer.model.normalization import norm_layer
from trainer.model.roi_align import PyramidROIAlign
from trainer.model.time_distributed import TimeDistributed


def classifier_head(rois, feature_maps, image_meta, *, pool_size: int, num_classes: int,
                    train_bn: bool, fc_size: int = 1024, norm: str = "batch", dtype=None):
    """rois float32 [B, R, 4] normalised -> (class logits [B, R, num_classes],
    class probabilities [B, R, num_classes], box deltas [B, R, num_classes, 4]).
    norm: "batch" (matterport) or "group" (GroupNorm in the `mrcnn_class_bn*` slots).
    dtype: the Keras dtype policy of the convolutions and dense layers (None: the global one);
    the ROI pooling, the probabilities and the box deltas stay float32 (logits are in dtype's
    compute dtype: the loss casts them)."""
    num_rois = rois.shape[1]
    x = PyramidROIAlign((pool_size, pool_size), name="roi_align_classifier")(
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
              train_bn: bool, roi_valid=None, norm: str = "batch", dtype=None):
    """rois float32 [B, R, 4] normalised -> mask logits [B, R, 2 * pool, 2 * pool, num_classes].

    roi_valid: bool [B, R], the slots holding real ROIs (default: non-zero boxes). With
    BatchNorm, only those enter the statistics (see `RoiBatchNorm`); norm "group" normalises
    each ROI by itself (GroupNorm in the `mrcnn_mask_bn*` slots).
    `mrcnn_mask` has no activation here (matterport's has a sigmoid): the loss works on logits,
    which is exact where the sigmoid saturates; inference applies the sigmoid after it.
    dtype: the Keras dtype policy of the convolutions (None: the global one); the ROI pooling
    stays float32, the logits come out in dtype's compute dtype.
    """
    if roi_valid is None:
        roi_valid = layers.Lambda(lambda r: r[..., 2] > r[..., 0], name="mask_roi_valid")(rois)
    x = PyramidROIAlign((pool_size, pool_size), name="roi_align_mask")(
        [rois, image_meta, *feature_maps])
    for i in range(1, 5):
        x = TimeDistributed(layers.Conv2D(256, 3, padding="same", dtype=dtype),
                            name=f"mrcnn_mask_conv{i}", dtype=dtype)(x)
        if norm == "group":
            x = TimeDistributed(norm_layer(norm, train_bn, dtype=dtype),
                                name=f"mrcnn_mask_bn{i}", dtype=dtype)(x)
        else:
            x = RoiBatchNorm(train_bn, name=f"mrcnn_mask_bn{i}", dtype=dtype)([x, roi_valid])
        x = layers.Activation("relu", dtype=dtype)(x)
    x = TimeDistributed(layers.Conv2DTranspose(256, 2, strides=2, activation="relu",
                                               dtype=dtype),
                        name="mrcnn_mask_deconv", dtype=dtype)(x)
    return TimeDistributed(layers.Conv2D(num_classes, 1, dtype=dtype), name="mrcnn_mask",
                           dtype=dtype)(x)
