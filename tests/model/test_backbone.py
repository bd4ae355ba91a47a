"""ResNet-18 (not matterport's; a light backbone for CPU runs) and NORM=group."""

import keras

from trainer.model.backbone import resnet_graph


def test_resnet18_stages_strides_channels_and_parameters():
    image = keras.Input((128, 128, 3))
    model = keras.Model(image, resnet_graph(image, "resnet18", train_bn=True))
    assert [tuple(c.shape[1:]) for c in model.outputs] == [
        (32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)]  # strides 4, 8, 16, 32
    names = {layer.name for layer in model.layers}
    assert {"res2b_branch2b", "bn5b_branch2b", "res3a_branch1", "res5a_branch1"} <= names
    assert "res2a_branch1" not in names  # stage 2 keeps 64 channels at stride 1: no projection
    # torchvision's resnet18 without its fc layer has 11,176,512 weights; ours adds a bias per
    # convolution channel (4,800 of them) and BatchNorm's moving mean and variance (2 x 4,800).
    assert model.count_params() == 11_176_512 + 4_800 + 2 * 4_800


def test_group_norm_backbone_keeps_the_bn_names():
    image = keras.Input((64, 64, 3))
    model = keras.Model(image, resnet_graph(image, "resnet18", norm="group"))
    layer = model.get_layer("bn3a_branch2a")
    assert isinstance(layer, keras.layers.GroupNormalization) and layer.groups == 32
