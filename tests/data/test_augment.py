"""trainer.data.augment: declarative augmentation in TF ops; masks and boxes follow the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from trainer.config import Config
from trainer.data.augment import Augmentation
from trainer.data.shapes import generate_sample
from trainer.data.transforms import boxes_from_masks, training_example
from trainer.errors import UserError
from trainer.model.anchors import anchors_for_image

SIZE = 32
BOX = (5, 4, 13, 10)  # y1, x1, y2, x2 (exclusive) of the bright square; not symmetric
README_EXAMPLE = "{sometimes: 0.5, then: [{fliplr: 0.5}, {gaussian_blur: [0.0, 5.0]}]}"


def square_sample(size: int = SIZE, box: tuple[int, int, int, int] = BOX):
    """A white square on black, and its mask: image uint8 [S, S, 3], masks bool [S, S, 1]."""
    y1, x1, y2, x2 = box
    image = np.zeros((size, size, 3), np.uint8)
    image[y1:y2, x1:x2] = 255
    masks = np.zeros((size, size, 1), bool)
    masks[y1:y2, x1:x2] = True
    return image, masks


def augment(spec, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out_image, out_masks = Augmentation.from_spec(spec)(image, masks)
    assert out_image.dtype == tf.uint8 and out_image.shape == image.shape
    assert out_masks.dtype == tf.bool and out_masks.shape == masks.shape
    return out_image.numpy(), out_masks.numpy()


def boxes(masks: np.ndarray) -> list[list[int]]:
    return boxes_from_masks(tf.constant(masks)).numpy().tolist()


def assert_aligned(image: np.ndarray, masks: np.ndarray) -> None:
    """The bright pixels are exactly the mask (every channel)."""
    for channel in range(image.shape[-1]):
        np.testing.assert_array_equal(image[..., channel] > 127, masks[..., 0])


# --- Geometric augmenters move image and masks together ---

@pytest.mark.parametrize("spec, expected_image, expected_box", [
    ({"fliplr": 1.0}, lambda x: x[:, ::-1], [5, 22, 13, 28]),  # x: 32 - 10, 32 - 4
    ({"flipud": 1.0}, lambda x: x[::-1], [19, 4, 27, 10]),  # y: 32 - 13, 32 - 5
])
def test_flips_move_masks_and_boxes_with_the_image(spec, expected_image, expected_box) -> None:
    image, masks = square_sample()
    out_image, out_masks = augment(spec, image, masks)
    np.testing.assert_array_equal(out_image, expected_image(image))
    np.testing.assert_array_equal(out_masks, expected_image(masks))
    assert_aligned(out_image, out_masks)
    assert boxes(out_masks) == [expected_box]


def test_affine_translation_is_an_exact_integer_shift() -> None:
    image, masks = square_sample()
    out_image, out_masks = augment({"affine": {"translate_percent": 0.25}}, image, masks)
    shifted = np.zeros_like(image)
    shifted[8:, 8:] = image[:-8, :-8]  # 0.25 * 32 = 8 pixels right and down, black fill
    np.testing.assert_array_equal(out_image, shifted)
    assert_aligned(out_image, out_masks)
    assert boxes(out_masks) == [[13, 12, 21, 18]]  # BOX + 8


def test_affine_rotation_is_clockwise_about_the_centre() -> None:
    image, masks = square_sample()
    out_image, out_masks = augment({"affine": {"rotate": 90}}, image, masks)
    assert_aligned(out_image, out_masks)
    # Clockwise by 90 degrees: new x = 31 - y, new y = x.
    assert boxes(out_masks) == [[4, 19, 10, 27]]
    np.testing.assert_array_equal(out_masks[..., 0], np.rot90(masks[..., 0], k=-1))


def test_crop_and_pad_crop_then_resize_back() -> None:
    image, masks = square_sample()
    out_image, out_masks = augment({"crop_and_pad": {"percent": -0.25}}, image, masks)
    # 8 px cropped from each side, the 16 px left scaled by 2: rows 5..13 -> -3..5 -> 0..10,
    # columns 4..10 -> -4..2 -> 0..4. Samples fall at quarter pixels, so bilinear never ties
    # and the thresholded image equals the nearest-sampled mask.
    assert_aligned(out_image, out_masks)
    assert boxes(out_masks) == [[0, 0, 10, 4]]


def test_crop_and_pad_pad_then_resize_back() -> None:
    image, masks = square_sample()
    out_image, out_masks = augment({"crop_and_pad": {"percent": 1.0}}, image, masks)
    # 32 px of black on every side, the 96 px canvas scaled by 1/3: output row y samples input
    # row 3y + 1 - 32 exactly, so rows 5..12 -> 12..15 and columns 4..9 -> 12..14.
    assert boxes(out_masks) == [[12, 12, 15, 14]]
    padded = np.pad(image, [(32, 32), (32, 32), (0, 0)])
    np.testing.assert_array_equal(out_image, padded[1::3, 1::3])
    assert_aligned(out_image, out_masks)


def test_rot90_turns_square_images_and_leaves_others() -> None:
    tf.random.set_seed(3)
    image, masks = square_sample()
    seen = set()
    for _ in range(12):
        out_image, out_masks = augment({"rot90": 1.0}, image, masks)
        k = next(k for k in (1, 2, 3) if np.array_equal(out_masks, np.rot90(masks, k)))
        np.testing.assert_array_equal(out_image, np.rot90(image, k))
        seen.add(k)
    assert seen == {1, 2, 3}
    wide_image, wide_masks = np.zeros((16, 24, 3), np.uint8), np.ones((16, 24, 2), bool)
    wide_image[0, 0] = 255
    out_image, out_masks = augment({"rot90": 1.0}, wide_image, wide_masks)
    np.testing.assert_array_equal(out_image, wide_image)


# --- Photometric augmenters change the image only ---

@pytest.mark.parametrize("spec, pixel_out", [
    ({"multiply": 1.5}, 150),  # 100 * 1.5
    ({"add": 30}, 130),
    ({"add": 200}, 255),  # saturates instead of wrapping around to 44
    ({"multiply": 0.0}, 0),
    ({"contrast": 2.0}, 72),  # 128 + 2 * (100 - 128)
    ({"gaussian_blur": 2.0}, 100),  # a flat image stays flat, borders included
])
def test_photometric_values(spec, pixel_out: int) -> None:
    image = np.full((SIZE, SIZE, 3), 100, np.uint8)
    _, masks = square_sample()
    out_image, out_masks = augment(spec, image, masks)
    np.testing.assert_array_equal(out_image, np.full_like(image, pixel_out))
    np.testing.assert_array_equal(out_masks, masks)


@pytest.mark.parametrize("spec", [{"multiply": [0.5, 0.7]}, {"add": [-60, -40]},
                                  {"contrast": [1.5, 2.0]}, {"gaussian_noise": [5, 10]},
                                  {"gaussian_blur": [1.0, 2.0]}, {"grayscale": [1.0, 1.0]}])
def test_photometric_augmenters_change_the_image_but_not_the_masks(spec) -> None:
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    _, masks = square_sample()
    out_image, out_masks = augment(spec, image, masks)
    assert np.abs(out_image.astype(int) - image).mean() > 1.0
    np.testing.assert_array_equal(out_masks, masks)
    if "grayscale" in spec:
        assert (out_image == out_image[..., :1]).all()


# --- Probabilities ---

def test_flip_probability_zero_never_one_always() -> None:
    image, masks = square_sample()
    for _ in range(10):
        assert boxes(augment({"fliplr": 0.0}, image, masks)[1]) == [list(BOX)]
        assert boxes(augment({"fliplr": 1.0}, image, masks)[1]) == [[5, 22, 13, 28]]


def test_sometimes_half_the_time() -> None:
    tf.random.set_seed(7)
    image, masks = square_sample()
    sometimes = Augmentation.from_spec({"sometimes": 0.5, "then": [{"fliplr": 1.0}],
                                        "else": [{"flipud": 1.0}]})
    flipped_lr = sum(boxes(sometimes(image, masks)[1].numpy()) == [[5, 22, 13, 28]]
                     for _ in range(200))
    assert 60 <= flipped_lr <= 140  # binomial(200, 0.5): mean 100, sd about 7


def test_one_of_and_some_of_pick_children() -> None:
    tf.random.set_seed(11)
    image, masks = square_sample()
    one_of = Augmentation.from_spec({"one_of": [{"fliplr": 1.0}, {"flipud": 1.0}]})
    seen = {tuple(boxes(one_of(image, masks)[1].numpy())[0]) for _ in range(20)}
    assert seen == {(5, 22, 13, 28), (19, 4, 27, 10)}  # never both, never neither
    both = Augmentation.from_spec({"some_of": {"n": 2, "of": [{"fliplr": 1}, {"flipud": 1}]}})
    assert boxes(both(image, masks)[1].numpy()) == [[19, 22, 27, 28]]


# --- Spec: round trip, files, errors ---

def test_spec_round_trip_and_normalisation(tmp_path: Path) -> None:
    augmentation = Augmentation.from_spec(README_EXAMPLE)
    assert augmentation.to_spec() == yaml.safe_load(README_EXAMPLE)
    assert Augmentation.from_spec(augmentation.to_spec()).to_spec() == augmentation.to_spec()
    assert "gaussian_blur: [0.0, 5.0]" in augmentation.describe()
    # Shorthands are normalised: a list is `sequential`, one number x is the range [x, x].
    assert Augmentation.from_spec([{"fliplr": 1}, {"add": 5}]).to_spec() == {
        "sequential": [{"fliplr": 1.0}, {"add": [5.0, 5.0]}]}
    assert Augmentation.from_spec({"affine": {"rotate": [-10, 10]}}).to_spec() == {
        "affine": {"scale": [1.0, 1.0], "translate_percent": [0.0, 0.0], "rotate": [-10.0, 10.0]}}
    assert Augmentation.from_spec(None).to_spec() is None
    (tmp_path / "aug.yaml").write_text(README_EXAMPLE)
    (tmp_path / "aug.json").write_text(json.dumps(augmentation.to_spec()))
    for path in (tmp_path / "aug.yaml", str(tmp_path / "aug.json")):
        assert Augmentation.from_spec(path).to_spec() == augmentation.to_spec()


@pytest.mark.parametrize("spec, message", [
    ({"flipl": 0.5}, "unknown augmenter 'flipl', did you mean 'fliplr'?"),
    ([{"fliplr": 0.5}, {"gausian_blur": 1}], "sequential[1]: unknown augmenter 'gausian_blur', "
                                             "did you mean 'gaussian_blur'?"),
    ({"fliplr": 1.5}, "fliplr probability: 1.5 is outside the allowed [0, 1]"),
    ({"sometimes": -0.1, "then": []}, "sometimes probability: -0.1 is outside the allowed [0, 1]"),
    ({"gaussian_blur": [5.0, 1.0]}, "gaussian_blur: lo 5 > hi 1"),
    ({"multiply": "bright"}, "multiply: expected a number, got 'bright' (str)"),
    ({"fliplr": True}, "fliplr probability: expected a number, got True (bool)"),
    ({"affine": {"scal": 2}}, "affine: unknown parameter 'scal', did you mean 'scale'?"),
    ({"crop_and_pad": {"percent": [0.0, 1.0, 2.0]}}, "expected [lo, hi], got 3 values"),
    ({"some_of": {"n": [1, 3], "of": [{"fliplr": 1}]}}, "some_of.n: 3 is outside the allowed"),
    ({"fliplr": 0.5, "flipud": 0.5}, "one augmenter per mapping"),
    ("missing.yaml", "augmentation spec file missing.yaml"),
])
def test_bad_specs_say_where_and_why(spec, message: str) -> None:
    with pytest.raises(UserError) as error:
        Augmentation.from_spec(spec)
    assert message in str(error.value)


# --- In the input pipeline ---

@pytest.mark.parametrize("height, width", [(SIZE, SIZE), (SIZE, SIZE + 8)])
def test_runs_inside_dataset_map_with_no_instances(height: int, width: int) -> None:
    augmentation = Augmentation.from_spec(
        [{"sometimes": 0.5, "then": {"affine": {"rotate": [-20, 20], "scale": [0.8, 1.2]}}},
         {"fliplr": 0.5}, {"rot90": 0.5}, {"crop_and_pad": {"percent": [-0.2, 0.2]}},
         {"one_of": [{"gaussian_blur": [0, 1]}, {"gaussian_noise": [0, 5]}]}])
    pair = (tf.fill([height, width, 3], tf.constant(90, tf.uint8)),
            tf.zeros([height, width, 0], bool))
    dataset = tf.data.Dataset.from_tensors(pair).repeat(4).map(augmentation)
    # Static shapes survive the branches (rot90 turns square images only).
    assert dataset.element_spec[0].shape == (height, width, 3)
    assert dataset.element_spec[1].shape == (height, width, 0)
    for image, masks in dataset:
        assert image.dtype == tf.uint8 and masks.shape == (height, width, 0)


def test_training_example_boxes_are_mirrored() -> None:
    config = Config.from_yaml(Path(__file__).parents[2] / "configs" / "demo.yaml")
    anchors = tf.constant(anchors_for_image(config, config.IMAGE_SHAPE), tf.float32)
    sample = generate_sample(5, config.IMAGE_MAX_DIM, config.IMAGE_MAX_DIM, min_instances=2)
    width = config.IMAGE_MAX_DIM  # square mode at the sample's own size: no resize

    def instances(**kwargs) -> list[tuple[int, ...]]:
        inputs = training_example(sample.image, sample.masks, sample.class_ids, config,
                                  anchors, **kwargs)
        class_ids = inputs["input_gt_class_ids"].numpy()
        gt_boxes = inputs["input_gt_boxes"].numpy().astype(int)
        # Instances come out in random order and zero-padded: compare sorted real rows.
        return sorted((int(c), *b) for c, b in zip(class_ids, gt_boxes) if c != 0)

    plain = instances()
    assert len(plain) == sample.masks.shape[-1] >= 2
    mirrored = sorted((c, y1, width - x2, y2, width - x1) for c, y1, x1, y2, x2 in plain)
    assert instances(augment=Augmentation.from_spec({"fliplr": 1.0})) == mirrored
