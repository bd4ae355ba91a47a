"""Feature Pyramid Network on the ResNet stages: P2..P5 (3x3 smoothed) and P6 (subsampled P5)."""

from __future__ import annotations

from keras import layers

from trainer.model.conv import Conv2D
from trainer.model.normalization import norm_layer


def fpn_graph(c2, c3, c4, c5, depth: int = 256, norm: str | None = None, dtype=None):
    """Top-down pathway with lateral 1x1 connections (fpn_c5p5, fpn_c4p4, ...).

    norm: None (matterport: no normalisation) or "group": GroupNorm after every lateral and
    output convolution (`fpn_c5p5_norm`, `fpn_p2_norm`, ...), as Detectron2's FPN with GN.
    dtype: the layers' Keras dtype policy (None: the global one).
    Returns [P2, P3, P4, P5, P6], each with `depth` channels, at strides 4..64.
    """

    def conv(x, kernel: int, name: str):
        x = Conv2D(depth, kernel, padding="same", name=name, dtype=dtype)(x)  # see conv.py
        return x if norm is None else norm_layer(norm, True, name=f"{name}_norm", dtype=dtype)(x)

    p5 = conv(c5, 1, "fpn_c5p5")
    p4 = layers.Add(name="fpn_p4add", dtype=dtype)(
        [layers.UpSampling2D(2, name="fpn_p5upsampled", dtype=dtype)(p5), conv(c4, 1, "fpn_c4p4")]
    )
    p3 = layers.Add(name="fpn_p3add", dtype=dtype)(
        [layers.UpSampling2D(2, name="fpn_p4upsampled", dtype=dtype)(p4), conv(c3, 1, "fpn_c3p3")]
    )
    p2 = layers.Add(name="fpn_p2add", dtype=dtype)(
        [layers.UpSampling2D(2, name="fpn_p3upsampled", dtype=dtype)(p3), conv(c2, 1, "fpn_c2p2")]
    )
    p2 = conv(p2, 3, "fpn_p2")
    p3 = conv(p3, 3, "fpn_p3")
    p4 = conv(p4, 3, "fpn_p4")
    p5 = conv(p5, 3, "fpn_p5")
    # P6 only feeds the RPN (the largest anchors); a stride-2 subsample of P5, as in the paper.
    p6 = layers.MaxPooling2D(pool_size=1, strides=2, name="fpn_p6", dtype=dtype)(p5)
    return [p2, p3, p4, p5, p6]
