"""Region Proposal Network: one small model (`rpn_model`) shared by every pyramid level."""

from __future__ import annotations

import keras
from keras import layers

from trainer.model.conv import Conv2D


def build_rpn_model(anchor_stride: int, anchors_per_location: int, depth: int,
                    dtype=None, sparse_output_gradient: bool = False) -> keras.Model:
    """The RPN as a nested model named `rpn_model` (its weights live under that name in h5).

    Input: a feature map [batch, H, W, depth]. Outputs, anchors in `anchors.py` order:
      rpn_class_logits [batch, H * W * anchors_per_location, 2] (background, foreground)
      rpn_probs        [batch, H * W * anchors_per_location, 2]
      rpn_bbox         [batch, H * W * anchors_per_location, (dy, dx, log(dh), log(dw))]
    dtype: the convolutions' Keras dtype policy (None: the global one); the softmax runs in
    float32 whatever it is.
    sparse_output_gradient: the shared conv's gradients over the pixels under the anchors the
    losses sampled only (trainer/model/conv.py); not under XLA, which needs fixed shapes.
    """
    # Fed the FPN's maps in their compute dtype (a float32 input would cast them there and back).
    input_dtype = None if dtype is None else keras.dtype_policies.get(dtype).compute_dtype
    feature_map = keras.Input(shape=(None, None, depth), name="input_rpn_feature_map",
                              dtype=input_dtype)
    # Its gradients at P2 were the largest of the step: see trainer/model/conv.py.
    shared = Conv2D(512, 3, padding="same", activation="relu", strides=anchor_stride,
                    name="rpn_conv_shared", dtype=dtype,
                    sparse_output_gradient=sparse_output_gradient)(feature_map)
    x = layers.Conv2D(2 * anchors_per_location, 1, name="rpn_class_raw", dtype=dtype)(shared)
    logits = layers.Reshape((-1, 2), dtype=dtype)(x)
    probs = layers.Activation("softmax", name="rpn_class_xxx", dtype="float32")(logits)
    x = layers.Conv2D(4 * anchors_per_location, 1, name="rpn_bbox_pred", dtype=dtype)(shared)
    deltas = layers.Reshape((-1, 4), dtype=dtype)(x)
    return keras.Model(feature_map, [logits, probs, deltas], name="rpn_model")


def rpn_graph(rpn_model: keras.Model, feature_maps: list) -> tuple:
    """Runs `rpn_model` on every level; returns (logits, probs, deltas) over all anchors, in
    float32 (what the proposals and the losses take) whatever the model computes in."""
    per_level = [rpn_model(p) for p in feature_maps]
    names = ("rpn_class_logits", "rpn_class", "rpn_bbox")
    return tuple(
        layers.Concatenate(axis=1, name=name, dtype="float32")(
            [outputs[i] for outputs in per_level])
        for i, name in enumerate(names)
    )
