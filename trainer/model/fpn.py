"""Feature Pyramid Network on the ResNet stages: P2..P5 (3x3 smoothed) and P6 (subsampled P5)."""

from __future__ import annotations

from keras import layers


def fpn_graph(c2, c3, c4, c5, depth: int = 256):
    """Top-down pathway with lateral 1x1 connections (fpn_c5p5, fpn_c4p4, ...).

    Returns [P2, P3, P4, P5, P6], each with `depth` channels, at strides 4..64.
    """
    p5 = layers.Conv2D(depth, 1, name="fpn_c5p5")(c5)
    p4 = layers.Add(name="fpn_p4add")(
        [layers.UpSampling2D(2, name="fpn_p5upsampled")(p5),
         layers.Conv2D(depth, 1, name="fpn_c4p4")(c4)]
    )
    p3 = layers.Add(name="fpn_p3add")(
        [layers.UpSampling2D(2, name="fpn_p4upsampled")(p4),
         layers.Conv2D(depth, 1, name="fpn_c3p3")(c3)]
    )
    p2 = layers.Add(name="fpn_p2add")(
        [layers.UpSampling2D(2, name="fpn_p3upsampled")(p3),
         layers.Conv2D(depth, 1, name="fpn_c2p2")(c2)]
    )
    p2 = layers.Conv2D(depth, 3, padding="same", name="fpn_p2")(p2)
    p3 = layers.Conv2D(depth, 3, padding="same", name="fpn_p3")(p3)
    p4 = layers.Conv2D(depth, 3, padding="same", name="fpn_p4")(p4)
    p5 = layers.Conv2D(depth, 3, padding="same", name="fpn_p5")(p5)
    # P6 only feeds the RPN (the largest anchors); a stride-2 subsample of P5, as in the paper.
    p6 = layers.MaxPooling2D(pool_size=1, strides=2, name="fpn_p6")(p5)
    return [p2, p3, p4, p5, p6]
