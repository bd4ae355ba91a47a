import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.data.transforms import apply_geometry, boxes_from_masks, resize_geometry


def test_crop_mode_takes_a_random_min_dim_square_inside_the_image():
    config = Config(IMAGE_RESIZE_MODE="crop", IMAGE_MIN_DIM=64)
    image = tf.constant(np.arange(80 * 100, dtype=np.int32).reshape(80, 100, 1) % 251, tf.uint8)
    offsets = set()
    for _ in range(20):
        geometry = resize_geometry(80, 100, config)
        y, x = (int(v) for v in geometry["crop"])
        assert 0 <= y <= 80 - 64 and 0 <= x <= 100 - 64  # never outside: scale 1, no padding
        assert geometry["window"].numpy().tolist() == [0, 0, 64, 64]
        cropped = apply_geometry(image, geometry).numpy()
        np.testing.assert_array_equal(cropped, image.numpy()[y:y + 64, x:x + 64])
        offsets.add((y, x))
    assert len(offsets) > 1  # random, not a fixed corner


def test_square_mode_centres_the_scaled_image():
    config = Config(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=128)
    geometry = resize_geometry(32, 64, config)  # scaled by 2 to 64 x 128, padded 32 above/below
    assert float(geometry["scale"]) == 2.0
    assert geometry["window"].numpy().tolist() == [32, 0, 96, 128]
    masks = np.zeros((32, 64, 1), np.uint8)
    masks[4:8, 10:20] = 1
    resized = apply_geometry(tf.constant(masks), geometry, method="nearest").numpy() > 0
    np.testing.assert_array_equal(boxes_from_masks(tf.constant(resized)).numpy(),
                                  [[32 + 8, 20, 32 + 16, 40]])
