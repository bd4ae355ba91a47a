"""trainer.engine.inference: grouping images by molded shape (what detect and evaluate batch)."""

from trainer.config import Config
from trainer.engine.inference import batches_by_shape, molded_shape


def test_batches_share_a_shape_keep_input_order_and_fill_before_the_rest():
    items = [("a", 1), ("b", 2), ("c", 1), ("d", 1), ("e", 2), ("f", 3)]
    batches = list(batches_by_shape(items, lambda item: item[1], 2))
    # full groups as soon as they fill ([a, c] then [b, e]); the partial ones at the end
    assert batches == [[("a", 1), ("c", 1)], [("b", 2), ("e", 2)], [("d", 1)], [("f", 3)]]


def test_molded_shape_is_one_shape_in_square_mode_and_per_size_in_pad64():
    square = Config(IMAGE_RESIZE_MODE="square", IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128)
    assert molded_shape((40, 90, 3), square) == molded_shape((300, 200, 3), square) == (128, 128)
    pad64 = Config(IMAGE_RESIZE_MODE="pad64", IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=256)
    assert molded_shape((128, 128, 3), pad64) == (128, 128)
    assert molded_shape((128, 200, 3), pad64) == (128, 256)  # 200 padded up to a multiple of 64


def test_images_batch_by_their_molded_shape_in_pad64_mode():
    config = Config.from_yaml("configs/demo.yaml", ["IMAGE_RESIZE_MODE=pad64", "IMAGE_MIN_DIM=64"])
    # Padded to 64x64, 64x128, 64x64, 64x128, 128x64 (scale 1: every short side is >= 64).
    sizes = [(64, 64), (64, 100), (64, 64), (64, 128), (70, 64)]
    batches = list(batches_by_shape(range(len(sizes)),
                                    lambda i: molded_shape(sizes[i], config), config.BATCH_SIZE))
    assert batches == [[0, 2], [1, 3], [4]]
