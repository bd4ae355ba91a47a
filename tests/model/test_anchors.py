import numpy as np

from trainer.config import Config
from trainer.model.anchors import anchors_for_image, feature_shapes, level_anchors

S = 11.3137085  # 16 / sqrt(2): half the short side of a 0.5 or 2 ratio anchor of scale 32
L = 22.6274170  # 16 * sqrt(2): half the long side


def test_level_anchors_literal_values_and_order():
    anchors = level_anchors(32, [0.5, 1, 2], (2, 2), feature_stride=4).numpy()
    assert anchors.shape == (2 * 2 * 3, 4)
    expected_first_cell = [
        [-L, -S, L, S],  # ratio 0.5 (width / height): tall
        [-16, -16, 16, 16],  # ratio 1
        [-S, -L, S, L],  # ratio 2: wide
    ]
    np.testing.assert_allclose(anchors[:3], expected_first_cell, atol=1e-4)
    # Cells go row by row: cell (0, 1) is centred at x = 1 * stride, cell (1, 0) at y = 4.
    np.testing.assert_allclose(anchors[4], [-16, -12, 16, 20], atol=1e-4)
    np.testing.assert_allclose(anchors[7], [-12, -16, 20, 16], atol=1e-4)
    np.testing.assert_allclose(anchors[11], [4 - S, 4 - L, 4 + S, 4 + L], atol=1e-4)


def test_anchor_stride_skips_cells():
    anchors = level_anchors(8, [1], (4, 4), feature_stride=4, anchor_stride=2).numpy()
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    np.testing.assert_allclose(centres, [[0, 0], [0, 8], [8, 0], [8, 8]])


def test_pyramid_anchors_count_and_normalisation():
    config = Config(IMAGE_MAX_DIM=128, IMAGE_MIN_DIM=128, RPN_ANCHOR_SCALES=(8, 16, 32, 64, 128))
    assert feature_shapes((128, 128), config.BACKBONE_STRIDES) == [
        (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    pixels = anchors_for_image(config, (128, 128))
    assert pixels.shape == ((32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2) * 3, 4)
    # The first P6 anchor: scale 128, ratio 0.5, centred at the origin.
    first_p6 = (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4) * 3
    np.testing.assert_allclose(pixels[first_p6], [-90.50967, -45.254833, 90.50967, 45.254833],
                               rtol=1e-5)
    normalized = anchors_for_image(config, (128, 128), normalized=True)
    # matterport's norm_boxes: (y1, x1, y2 - 1, x2 - 1) / (size - 1)
    np.testing.assert_allclose(normalized, (pixels - [0, 0, 1, 1]) / 127.0, rtol=1e-5, atol=1e-6)
