"""ResNet-50/101 backbone with matterport's layer names (res2a_branch2a, bn2a_branch2a, ...).

Stage 1 is conv1 + bn_conv1 + 3x3 max-pool (stride 4 in all); stages 2-5 are bottleneck blocks:
a `conv_block` (projection shortcut, `..._branch1`) then `identity_block`s, named by stage
number and block letter. Convolutions keep their bias, as in the released weights.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.model.batch_norm import BatchNorm

# Identity blocks after the first block of stage 4: the only difference between the depths.
STAGE4_IDENTITY_BLOCKS = {"resnet50": 5, "resnet101": 22}


def _bottleneck(x, filters: tuple[int, int, int], stage: int, block: str, train_bn: bool,
                strides: int = 1, projection: bool = False):
    conv = f"res{stage}{block}_branch"
    norm = f"bn{stage}{block}_branch"
    f1, f2, f3 = filters
    shortcut = x
    y = layers.Conv2D(f1, 1, strides=strides, name=conv + "2a")(x)
    y = BatchNorm(train_bn, name=norm + "2a")(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(f2, 3, padding="same", name=conv + "2b")(y)
    y = BatchNorm(train_bn, name=norm + "2b")(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(f3, 1, name=conv + "2c")(y)
    y = BatchNorm(train_bn, name=norm + "2c")(y)
    if projection:
        shortcut = layers.Conv2D(f3, 1, strides=strides, name=conv + "1")(x)
        shortcut = BatchNorm(train_bn, name=norm + "1")(shortcut)
    y = layers.Add()([y, shortcut])
    return layers.Activation("relu", name=f"res{stage}{block}_out")(y)


def _stage(x, filters, stage: int, blocks: int, train_bn: bool, strides: int):
    x = _bottleneck(x, filters, stage, "a", train_bn, strides=strides, projection=True)
    for i in range(1, blocks):
        x = _bottleneck(x, filters, stage, chr(ord("a") + i), train_bn)
    return x


def resnet_graph(image: keras.KerasTensor, architecture: str, train_bn: bool = False):
    """Builds the backbone on `image` [batch, H, W, C].

    Returns the stage outputs [C2, C3, C4, C5] at strides 4, 8, 16, 32 with 256, 512, 1024 and
    2048 channels.
    """
    if architecture not in STAGE4_IDENTITY_BLOCKS:
        raise ValueError(f"unknown backbone {architecture!r}: expected resnet50 or resnet101")
    x = layers.ZeroPadding2D(3)(image)
    x = layers.Conv2D(64, 7, strides=2, name="conv1")(x)
    x = BatchNorm(train_bn, name="bn_conv1")(x)
    x = layers.Activation("relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    c2 = _stage(x, (64, 64, 256), 2, 3, train_bn, strides=1)
    c3 = _stage(c2, (128, 128, 512), 3, 4, train_bn, strides=2)
    c4 = _stage(c3, (256, 256, 1024), 4, 1 + STAGE4_IDENTITY_BLOCKS[architecture], train_bn, 2)
    c5 = _stage(c4, (512, 512, 2048), 5, 3, train_bn, strides=2)
    return [c2, c3, c4, c5]
