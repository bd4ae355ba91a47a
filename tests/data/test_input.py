"""trainer.data.input: shards -> batched model inputs, in tf.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer.config import Config
from trainer.data import input as data_input
from trainer.data.prepare import prepare_dataset
from trainer.errors import UserError

QUIET = {"workers": 1, "progress": False}


def _config(**overrides) -> Config:
    values = dict(NUM_CLASSES=4, BACKBONE="resnet50", IMAGES_PER_GPU=2, IMAGE_RESIZE_MODE="square",
                  IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64, RPN_ANCHOR_SCALES=(8, 16, 32, 64, 128),
                  RPN_TRAIN_ANCHORS_PER_IMAGE=32, MAX_GT_INSTANCES=6, MINI_MASK_SHAPE=(14, 14))
    return Config(**{**values, **overrides})


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("input") / "ds"
    prepare_dataset("shapes", out, count=8, image_size=64, val_fraction=0.4, shards=2, **QUIET)
    return out


def _flip(image: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return image[:, ::-1], masks[:, ::-1]


def test_training_batches_have_the_model_input_shapes(shapes_dir: Path) -> None:
    config = _config()
    batch = next(iter(data_input.training_dataset(str(shapes_dir), config)))
    assert batch["input_image"].shape == (2, 64, 64, 3)
    assert batch["input_image_meta"].shape == (2, config.IMAGE_META_SIZE)
    assert batch["input_gt_class_ids"].shape == (2, 6)
    assert batch["input_gt_boxes"].shape == (2, 6, 4)
    assert batch["input_gt_masks"].shape == (2, 14, 14, 6)
    assert batch["input_rpn_bbox"].shape == (2, 32, 4)
    assert set(np.unique(batch["input_gt_class_ids"].numpy())) <= {0, 1, 2, 3}


def test_evaluation_order_and_augmentation_by_source(shapes_dir: Path) -> None:
    config = _config(IMAGES_PER_GPU=1)
    info = data_input.read_dataset_info(str(shapes_dir))

    def images(**kwargs) -> tuple[list[int], list[np.ndarray]]:
        dataset = data_input.training_dataset(str(shapes_dir), config, split="val",
                                              shuffle=False, repeat=False, **kwargs)
        batches = list(dataset)
        return ([int(b["input_image_meta"][0, 0]) for b in batches],
                [b["input_image"].numpy() for b in batches])

    ids, plain = images()
    assert len(ids) == info["splits"]["val"]["images"] > 0
    eval_ids = [int(b["input_image_meta"][0, 0])
                for b in data_input.evaluation_dataset(str(shapes_dir), config)]
    assert eval_ids == ids
    _, flipped = images(augmentation=_flip)
    _, skipped = images(augmentation=_flip, no_augmentation_sources=["shapes"])
    for a, b, c in zip(plain, flipped, skipped):
        np.testing.assert_array_equal(b, a[:, :, ::-1])  # the whole 64 px square, mirrored
        np.testing.assert_array_equal(c, a)  # "shapes" is exempt from augmentation


def test_crowd_regions_get_negative_class_ids(tiny_coco: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    annotations, images = tiny_coco
    prepare_dataset("coco", tmp_path / "ds", annotations=str(annotations), images=str(images),
                    val_fraction=0.0, **QUIET)
    config = _config(IMAGES_PER_GPU=1)
    by_id = {int(b["input_image_meta"][0, 0]): sorted(b["input_gt_class_ids"][0].numpy())
             for b in data_input.training_dataset(str(tmp_path / "ds"), config, shuffle=False,
                                                  repeat=False)}
    assert by_id[20] == [-1, 0, 0, 0, 0, 3]  # the crowd cat (1) and a bird, padded to 6
    assert by_id[10] == [0, 0, 0, 0, 1, 2]


def test_class_count_mismatch_and_empty_split_are_user_errors(tmp_path: Path,
                                                              shapes_dir: Path) -> None:
    with pytest.raises(UserError, match="NUM_CLASSES=5 but .* has 4 classes.*NUM_CLASSES=4"):
        data_input.training_dataset(str(shapes_dir), _config(NUM_CLASSES=5))
    prepare_dataset("shapes", tmp_path / "no_val", count=2, image_size=64, val_fraction=0.0,
                    **QUIET)
    with pytest.raises(UserError, match="val split .* is empty"):
        data_input.evaluation_dataset(str(tmp_path / "no_val"), _config())
