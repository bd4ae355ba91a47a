import numpy as np
import pytest

from trainer.config import Config, ConfigError, parse_assignments


def test_defaults_are_matterports_and_derived_values_follow():
    config = Config(NUM_CLASSES=81, IMAGES_PER_GPU=3, GPU_COUNT=2)
    assert config.BACKBONE == "resnet101" and config.TRAIN_ROIS_PER_IMAGE == 200
    assert config.RPN_ANCHOR_SCALES == (32, 64, 128, 256, 512)
    assert config.BATCH_SIZE == 6
    np.testing.assert_array_equal(config.IMAGE_SHAPE, [1024, 1024, 3])
    assert config.IMAGE_META_SIZE == 12 + 81
    assert Config(IMAGE_RESIZE_MODE="crop", IMAGE_MIN_DIM=512).IMAGE_SHAPE.tolist() == [512, 512, 3]


def test_subclassing_as_in_matterport():
    class ShapesConfig(Config):
        NAME = "shapes"
        NUM_CLASSES = 4
        IMAGE_MAX_DIM = 128
        IMAGE_MIN_DIM = 128

    config = ShapesConfig(IMAGES_PER_GPU=1)
    assert (config.NAME, config.NUM_CLASSES, config.BATCH_SIZE) == ("shapes", 4, 1)
    assert isinstance(config.replace(NAME="x"), ShapesConfig)


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"'IMAGES_PER_GUP'.*did you mean IMAGES_PER_GPU"):
        Config(IMAGES_PER_GUP=2)


def test_invalid_values_say_which_constraint_failed():
    with pytest.raises(ConfigError, match=r"IMAGE_MAX_DIM must be a multiple of 64.*got 1000"):
        Config(IMAGE_MAX_DIM=1000)
    with pytest.raises(ConfigError, match=r"NUM_CLASSES: expected an integer"):
        Config(NUM_CLASSES="four")
    with pytest.raises(ConfigError, match=r"MASK_SHAPE must be twice MASK_POOL_SIZE"):
        Config(MASK_SHAPE=[32, 32])
    with pytest.raises(ConfigError, match=r"RPN_ANCHOR_SCALES needs one scale per pyramid level"):
        Config(RPN_ANCHOR_SCALES=[32, 64])
    with pytest.raises(ConfigError, match=r"LOSS_WEIGHTS: unknown loss 'mask_loss'"):
        Config(LOSS_WEIGHTS={"mask_loss": 2.0})
    with pytest.raises(ConfigError, match=r"BATCH_SIZE is derived"):
        Config(BATCH_SIZE=4)


def test_immutable():
    config = Config()
    with pytest.raises(AttributeError, match=r"replace\(IMAGES_PER_GPU="):
        config.IMAGES_PER_GPU = 4


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("NAME: t\nNUM_CLASSES: 4\nLOSS_WEIGHTS: {mrcnn_mask_loss: 2.0}\n")
    config = Config.from_yaml(path, ["IMAGES_PER_GPU=1", "RPN_ANCHOR_SCALES=[8, 16, 32, 64, 128]",
                                     "TRAIN_BN=true"])
    assert config.IMAGES_PER_GPU == 1 and config.TRAIN_BN is True
    assert config.RPN_ANCHOR_SCALES == (8, 16, 32, 64, 128)
    assert config.LOSS_WEIGHTS["mrcnn_mask_loss"] == 2.0
    assert config.LOSS_WEIGHTS["rpn_bbox_loss"] == 1.0
    round_trip = tmp_path / "round.yaml"
    round_trip.write_text(config.to_yaml())
    assert Config.from_yaml(round_trip) == config


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("NUM_CLASES: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'NUM_CLASES'"):
        Config.from_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        Config.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_assignments(["IMAGES_PER_GPU"])


def test_presets_load():
    presets = {name: Config.from_yaml(f"configs/{name}.yaml")
               for name in ("demo", "shapes", "coco", "shapes-scratch")}
    assert {name: c.NUM_CLASSES for name, c in presets.items()} == {
        "demo": 4, "shapes": 4, "coco": 81, "shapes-scratch": 4}
    # The CPU demo trains from random initialisation: the from-scratch recipe.
    demo = presets["demo"]
    assert (demo.BACKBONE, demo.NORM, demo.OPTIMIZER, demo.PROPOSALS_INCLUDE_GT) == (
        "resnet18", "group", "adam", True)


def test_scratch_training_keys_are_validated_and_off_by_default():
    config = Config()
    assert (config.OPTIMIZER, config.LR_WARMUP_STEPS, config.LR_DECAY, config.NORM,
            config.PROPOSALS_INCLUDE_GT) == ("sgd", 0, "none", "batch", False)
    for key, value, message in [
        ("OPTIMIZER", "rmsprop", "OPTIMIZER must be one of sgd, adam, adamw"),
        ("NORM", "layer", "NORM must be one of batch, group"),
        ("LR_DECAY", "step", "LR_DECAY must be one of none, cosine"),
        ("LR_WARMUP_STEPS", -1, "LR_WARMUP_STEPS must be >= 0"),
        ("BACKBONE", "resnet34", "BACKBONE must be one of resnet18, resnet50, resnet101"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Config(**{key: value})
    with pytest.raises(ConfigError, match="TOP_DOWN_PYRAMID_SIZE must be a multiple of 32"):
        Config(NORM="group", TOP_DOWN_PYRAMID_SIZE=48)
    assert Config(NORM="group", OPTIMIZER="adamw", BACKBONE="resnet18").NORM == "group"


def test_from_text_reads_what_to_yaml_writes_and_names_its_source_in_errors():
    config = Config(NAME="texty", NUM_CLASSES=5)
    assert Config.from_text(config.to_yaml()) == config
    assert Config.from_text("NUM_CLASSES: 3\n", ["NAME=x"]).NAME == "x"
    with pytest.raises(ConfigError, match=r"^config_yaml: unknown config key 'NUM_CLASES'"):
        Config.from_text("NUM_CLASES: 3\n", source="config_yaml")
    with pytest.raises(ConfigError, match="config text: expected a mapping"):
        Config.from_text("just a string")
