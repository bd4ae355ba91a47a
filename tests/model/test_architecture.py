"""The layer set of matterport's COCO model, written out independently of the model code."""

import math

import pytest

from trainer.config import Config
from trainer.model.mask_rcnn import build_inference_model, build_training_model

MATTERPORT_COCO_PARAMS = 64_158_584  # matterport's model summary for resnet101, 81 classes


def bn(channels):
    return [(channels,)] * 4  # gamma, beta, moving mean, moving variance


def conv(k, cin, cout):
    return [(k, k, cin, cout), (cout,)]


def expected_layers(backbone: str, num_classes: int) -> dict[str, list[tuple]]:
    layers = {"conv1": conv(7, 3, 64), "bn_conv1": bn(64)}
    stage4_blocks = {"resnet50": 6, "resnet101": 23}[backbone]
    stages = [(2, 64, 3), (3, 128, 4), (4, 256, stage4_blocks), (5, 512, 3)]
    channels_in = 64
    for stage, width, blocks in stages:
        for i in range(blocks):
            name = f"{stage}{chr(ord('a') + i)}_branch"
            cin = channels_in if i == 0 else 4 * width
            layers[f"res{name}2a"] = conv(1, cin, width)
            layers[f"bn{name}2a"] = bn(width)
            layers[f"res{name}2b"] = conv(3, width, width)
            layers[f"bn{name}2b"] = bn(width)
            layers[f"res{name}2c"] = conv(1, width, 4 * width)
            layers[f"bn{name}2c"] = bn(4 * width)
            if i == 0:
                layers[f"res{name}1"] = conv(1, cin, 4 * width)
                layers[f"bn{name}1"] = bn(4 * width)
        channels_in = 4 * width
    for level, cin in zip((5, 4, 3, 2), (2048, 1024, 512, 256), strict=True):
        layers[f"fpn_c{level}p{level}"] = conv(1, cin, 256)
        layers[f"fpn_p{level}"] = conv(3, 256, 256)
    layers["rpn_model"] = conv(3, 256, 512) + conv(1, 512, 6) + conv(1, 512, 12)
    layers["mrcnn_class_conv1"] = conv(7, 256, 1024)
    layers["mrcnn_class_bn1"] = bn(1024)
    layers["mrcnn_class_conv2"] = conv(1, 1024, 1024)
    layers["mrcnn_class_bn2"] = bn(1024)
    layers["mrcnn_class_logits"] = [(1024, num_classes), (num_classes,)]
    layers["mrcnn_bbox_fc"] = [(1024, 4 * num_classes), (4 * num_classes,)]
    for i in range(1, 5):
        layers[f"mrcnn_mask_conv{i}"] = conv(3, 256, 256)
        layers[f"mrcnn_mask_bn{i}"] = bn(256)
    layers["mrcnn_mask_deconv"] = [(2, 2, 256, 256), (256,)]
    layers["mrcnn_mask"] = conv(1, 256, num_classes)
    return layers


def weighted_layers(model) -> dict[str, list[tuple]]:
    return {layer.name: [tuple(w.shape) for w in layer.weights]
            for layer in model.layers if layer.weights}


@pytest.mark.parametrize("backbone", ["resnet101", "resnet50"])
def test_layer_names_and_weight_shapes_match_matterport(backbone):
    model = build_inference_model(Config(BACKBONE=backbone, NUM_CLASSES=81))
    expected = expected_layers(backbone, 81)
    actual = weighted_layers(model)
    assert sorted(actual) == sorted(expected)
    for name, shapes in expected.items():
        assert actual[name] == shapes, name
    total = sum(math.prod(s) for shapes in expected.values() for s in shapes)
    assert model.count_params() == total
    if backbone == "resnet101":
        assert len(actual) == 233
        assert total == MATTERPORT_COCO_PARAMS


def test_training_and_inference_models_share_layers_by_name():
    config = Config.from_yaml("configs/demo.yaml")
    training = weighted_layers(build_training_model(config))
    inference = weighted_layers(build_inference_model(config))
    assert training == inference
    assert training["mrcnn_class_logits"] == [(256, 4), (4,)]  # FPN_CLASSIF_FC_LAYERS_SIZE


def test_layers_without_xla_kernels_opt_out_of_jit():
    # Keras compiles with XLA on GPUs unless a layer says it cannot. The proposals' NMS is
    # XLA's (non_max_suppression_padded); the detection layer's combined NMS has no kernel.
    config = Config.from_yaml("configs/demo.yaml")
    assert build_training_model(config).get_layer("ROI").supports_jit
    inference = build_inference_model(config)
    assert inference.get_layer("mrcnn_detection").supports_jit is False
    assert inference.get_layer("roi_align_mask").supports_jit  # gathers only: XLA-friendly


def test_custom_layers_round_trip_their_config():
    from trainer.model.anchors import AnchorsLayer
    from trainer.model.batch_norm import BatchNorm, RoiBatchNorm
    from trainer.model.detection import DetectionLayer
    from trainer.model.proposals import ProposalLayer
    from trainer.model.roi_align import PyramidROIAlign
    from trainer.model.targets import DetectionTargetLayer

    layers = [
        AnchorsLayer((8, 16, 32, 64, 128), (0.5, 1, 2), (4, 8, 16, 32, 64), 2, name="a"),
        BatchNorm(train_bn=True, name="b"),
        RoiBatchNorm(train_bn=True, name="rb"),
        DetectionLayer(16, 0.6, 0.3, (0.1, 0.1, 0.2, 0.2), name="d"),
        ProposalLayer(100, 0.7, 500, (0.1, 0.1, 0.2, 0.2), name="p"),
        PyramidROIAlign((7, 7), name="r"),
        DetectionTargetLayer(32, 0.33, (0.1, 0.1, 0.2, 0.2), (28, 28), True, name="t"),
    ]
    for layer in layers:
        config = layer.get_config()
        rebuilt = type(layer).from_config(config)
        assert rebuilt.get_config() == config, type(layer).__name__
    assert layers[1].get_config()["train_bn"] is True
    assert layers[4].get_config()["pre_nms_limit"] == 500
