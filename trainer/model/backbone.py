"""ResNet-18/50/101 backbone with matterport's layer names (res2a_branch2a, bn2a_branch2a, ...).

Stage 1 is conv1 + bn_conv1 + 3x3 max-pool (stride 4 in all); stages 2-5 are bottleneck blocks
(ResNet-50/101): a `conv_block` (projection shortcut, `..._branch1`) then `identity_block`s,
named by stage number and block letter. Convolutions keep their bias, as in the released
weights. ResNet-18 (not matterport's; a light backbone for CPU runs from random
initialisation) has two basic blocks (two 3x3 convolutions, `..._branch2a`/`2b`) per stage, the
first of stages 3-5 with a projection shortcut. The `bn...` layers are BatchNorm or, with
NORM=group, GroupNorm under the same names (so `layers="3+"` selects the same layers).
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.model.normalization import norm_layer

# Blocks per stage (2, 3, 4, 5); ResNet-50 and -101 differ in stage 4 only.
STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BASIC_BLOCK_BACKBONES = ("resnet18",)


def _bottleneck(x, filters: tuple[int, int, int], stage: int, block: str, train_bn: bool,
                strides: int = 1, projection: bool = False, norm: str = "batch",
                dtype=None):
    conv = f"res{stage}{block}_branch"
    bn = f"bn{stage}{block}_branch"
    f1, f2, f3 = filters
    shortcut = x
    y = layers.Conv2D(f1, 1, strides=strides, name=conv + "2a", dtype=dtype)(x)
    y = norm_layer(norm, train_bn, name=bn + "2a", dtype=dtype)(y)
    y = layers.Activation("relu", dtype=dtype)(y)
    y = layers.Conv2D(f2, 3, padding="same", name=conv + "2b", dtype=dtype)(y)
    y = norm_layer(norm, train_bn, name=bn + "2b", dtype=dtype)(y)
    y = layers.Activation("relu", dtype=dtype)(y)
    y = layers.Conv2D(f3, 1, name=conv + "2c", dtype=dtype)(y)
    y = norm_layer(norm, train_bn, name=bn + "2c", dtype=dtype)(y)
    if projection:
        shortcut = layers.Conv2D(f3, 1, strides=strides, name=conv + "1", dtype=dtype)(x)
        shortcut = norm_layer(norm, train_bn, name=bn + "1", dtype=dtype)(shortcut)
    y = layers.Add(dtype=dtype)([y, shortcut])
    return layers.Activation("relu", name=f"res{stage}{block}_out", dtype=dtype)(y)


def _basic_block(x, filters: int, stage: int, block: str, train_bn: bool, strides: int = 1,
                 projection: bool = False, norm: str = "batch", dtype=None):
    conv = f"res{stage}{block}_branch"
    bn = f"bn{stage}{block}_branch"
    shortcut = x
    if strides > 1:  # "same" padding would be asymmetric for a stride-2 3x3 convolution
        x = layers.ZeroPadding2D(1, dtype=dtype)(x)
    y = layers.Conv2D(filters, 3, strides=strides, padding="valid" if strides > 1 else "same",
                      name=conv + "2a", dtype=dtype)(x)
    y = norm_layer(norm, train_bn, name=bn + "2a", dtype=dtype)(y)
    y = layers.Activation("relu", dtype=dtype)(y)
    y = layers.Conv2D(filters, 3, padding="same", name=conv + "2b", dtype=dtype)(y)
    y = norm_layer(norm, train_bn, name=bn + "2b", dtype=dtype)(y)
    if projection:
        shortcut = layers.Conv2D(filters, 1, strides=strides, name=conv + "1",
                                 dtype=dtype)(shortcut)
        shortcut = norm_layer(norm, train_bn, name=bn + "1", dtype=dtype)(shortcut)
    y = layers.Add(dtype=dtype)([y, shortcut])
    return layers.Activation("relu", name=f"res{stage}{block}_out", dtype=dtype)(y)


def _stage(x, width: int, stage: int, blocks: int, train_bn: bool, strides: int, basic: bool,
           norm: str, dtype=None):
    for i in range(blocks):
        block = chr(ord("a") + i)
        first = i == 0
        if basic:
            x = _basic_block(x, width, stage, block, train_bn, strides if first else 1,
                             projection=first and stage > 2, norm=norm, dtype=dtype)
        else:
            x = _bottleneck(x, (width, width, 4 * width), stage, block, train_bn,
                            strides if first else 1, projection=first, norm=norm, dtype=dtype)
    return x


def resnet_graph(image: keras.KerasTensor, architecture: str, train_bn: bool = False,
                 norm: str = "batch", dtype=None):
    """Builds the backbone on `image` [batch, H, W, C].

    Returns the stage outputs [C2, C3, C4, C5] at strides 4, 8, 16, 32 with 256, 512, 1024 and
    2048 channels (ResNet-18: 64, 128, 256, 512). dtype: the layers' Keras dtype policy
    (None: the global one, float32; "mixed_bfloat16": bfloat16 compute, float32 weights).
    """
    if architecture not in STAGE_BLOCKS:
        raise ValueError(f"unknown backbone {architecture!r}: expected one of "
                         f"{', '.join(STAGE_BLOCKS)}")
    basic = architecture in BASIC_BLOCK_BACKBONES
    x = layers.ZeroPadding2D(3, dtype=dtype)(image)
    x = layers.Conv2D(64, 7, strides=2, name="conv1", dtype=dtype)(x)
    x = norm_layer(norm, train_bn, name="bn_conv1", dtype=dtype)(x)
    x = layers.Activation("relu", dtype=dtype)(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", dtype=dtype)(x)
    outputs = []
    for stage, (blocks, width) in enumerate(zip(STAGE_BLOCKS[architecture],
                                                (64, 128, 256, 512), strict=True), start=2):
        x = _stage(x, width, stage, blocks, train_bn, 1 if stage == 2 else 2, basic, norm,
                   dtype)
        outputs.append(x)
    return outputs
