"""trainer.data.tfrecord: the keys on disk, and exact round trips through shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.data import shapes, tfrecord
from trainer.data.prepare import encode_mask_png, prepare_dataset

# DESIGN.md, "Dataset on disk": TF Model Garden's keys plus image/source.
DESIGN_KEYS = {
    "image/encoded", "image/format", "image/height", "image/width", "image/filename",
    "image/source_id", "image/source",
    "image/object/bbox/ymin", "image/object/bbox/xmin", "image/object/bbox/ymax",
    "image/object/bbox/xmax", "image/object/class/label", "image/object/class/text",
    "image/object/is_crowd", "image/object/area", "image/object/mask",
}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(masks: np.ndarray, boxes, class_ids, **overrides) -> bytes:
    height, width = masks.shape[:2]
    image = np.full((height, width, 3), 7, dtype=np.uint8)
    fields = dict(
        image_encoded=_png(image), image_format="png", height=height, width=width,
        filename="x.png", source_id="42", source="shapes", boxes=np.asarray(boxes),
        class_ids=class_ids, class_names=["square"] * len(class_ids),
        is_crowd=[False] * len(class_ids), area=[float(m) for m in masks.sum(axis=(0, 1))],
        masks_png=[encode_mask_png(masks[:, :, i]) for i in range(masks.shape[-1])],
    )
    fields.update(overrides)
    return tfrecord.encode_example(**fields)


def test_keys_on_disk_are_exactly_the_design_keys() -> None:
    masks = np.zeros((8, 10, 1), dtype=bool)
    masks[2:4, 3:6, 0] = True
    example = tf.train.Example.FromString(_example(masks, [[2, 3, 4, 6]], [1]))
    assert set(example.features.feature) == DESIGN_KEYS
    assert set(tfrecord.FEATURES) == DESIGN_KEYS
    feature = example.features.feature
    # Normalised: ymin = 2 / 8, xmax = 6 / 10.
    assert feature["image/object/bbox/ymin"].float_list.value == [0.25]
    assert feature["image/object/bbox/xmax"].float_list.value == [pytest.approx(0.6)]
    assert feature["image/object/class/text"].bytes_list.value == [b"square"]
    assert feature["image/object/area"].float_list.value == [6.0]  # 2 rows x 3 columns


def test_decode_inside_tf_data_with_and_without_objects() -> None:
    masks = np.zeros((8, 10, 2), dtype=bool)
    masks[2:4, 3:6, 0] = True
    masks[5:8, 0:2, 1] = True
    with_objects = _example(masks, [[2, 3, 4, 6], [5, 0, 8, 2]], [1, 3],
                            is_crowd=[False, True])
    without = _example(np.zeros((8, 10, 0), dtype=bool), np.zeros((0, 4)), [])
    dataset = tf.data.Dataset.from_tensor_slices([with_objects, without])
    first, second = list(dataset.map(tfrecord.decode_example))  # graph mode, as in training
    np.testing.assert_array_equal(first["masks"].numpy(), masks)
    np.testing.assert_allclose(first["boxes"].numpy(), [[0.25, 0.3, 0.5, 0.6], [0.625, 0, 1, 0.2]])
    assert first["class_ids"].numpy().tolist() == [1, 3]
    assert first["is_crowd"].numpy().tolist() == [False, True]
    assert first["image"].dtype == tf.uint8 and first["image"].shape == (8, 10, 3)
    assert first["source"].numpy() == b"shapes" and first["source_id"].numpy() == b"42"
    assert second["masks"].shape == (8, 10, 0)  # an explicit empty, not a failure
    assert second["boxes"].shape == (0, 4)
    assert second["class_ids"].shape == (0,)


def test_mismatched_object_lists_are_rejected() -> None:
    masks = np.zeros((8, 10, 1), dtype=bool)
    with pytest.raises(ValueError, match="per-object list"):
        _example(masks, [[2, 3, 4, 6]], [1, 2])


def test_shapes_round_trip_through_shards_is_exact(tmp_path: Path) -> None:
    summary = prepare_dataset("shapes", tmp_path / "ds", count=6, image_size=64, shards=2,
                              val_fraction=0.3, workers=1, progress=False)
    files = [tmp_path / "ds" / name for split in ("train", "val")
             for name in summary["splits"][split]["shards"]]
    seen = set()
    for example in tfrecord.read_examples([str(f) for f in files]):
        index = int(example["source_id"].numpy())
        seen.add(index)
        sample = shapes.generate_sample(index, 64, 64)  # seed 0: sample seed = index
        np.testing.assert_array_equal(example["image"].numpy(), sample.image)  # PNG: lossless
        np.testing.assert_array_equal(example["masks"].numpy(), sample.masks)
        assert example["class_ids"].numpy().tolist() == sample.class_ids.tolist()
        pixel_boxes = np.round(example["boxes"].numpy() * 64).astype(np.int32)
        np.testing.assert_array_equal(pixel_boxes, sample.boxes)
        assert example["source"].numpy() == b"shapes"
        assert example["filename"].numpy() == f"shapes-{index:06d}.png".encode()
    assert seen == set(range(6))
