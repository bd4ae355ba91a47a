"""Shards written in TF Model Garden's convention are read as they are: only its keys (no
`image/source`, no is_crowd or area for non-COCO data, 8-bit 0/1 mask PNGs) and no
dataset.json beside them."""

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.config import Config
from trainer.data import shapes, tfrecord
from trainer.data.input import read_dataset_info, training_dataset
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def model_garden_example(sample, image_id: int) -> bytes:
    """What Model Garden's converters write for one image: written here key by key, without
    our encoder."""
    height, width = sample.image.shape[:2]
    masks = np.moveaxis(sample.masks, -1, 0)
    ys, xs = zip(*[np.nonzero(mask) for mask in masks])
    floats = lambda values: tf.train.Feature(float_list=tf.train.FloatList(value=values))  # noqa: E731
    ints = lambda values: tf.train.Feature(int64_list=tf.train.Int64List(value=values))  # noqa: E731
    blobs = lambda values: tf.train.Feature(bytes_list=tf.train.BytesList(value=values))  # noqa: E731
    features = {
        "image/encoded": blobs([png(sample.image)]),
        "image/height": ints([height]),
        "image/width": ints([width]),
        "image/source_id": blobs([str(image_id).encode()]),
        "image/object/bbox/ymin": floats([y.min() / height for y in ys]),
        "image/object/bbox/xmin": floats([x.min() / width for x in xs]),
        "image/object/bbox/ymax": floats([(y.max() + 1) / height for y in ys]),
        "image/object/bbox/xmax": floats([(x.max() + 1) / width for x in xs]),
        "image/object/class/label": ints([int(c) for c in sample.class_ids]),
        "image/object/mask": blobs([png(mask.astype(np.uint8), "L") for mask in masks]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


@pytest.fixture
def model_garden_folder(tmp_path: Path) -> Path:
    samples = list(shapes.generate(6, seed=4, height=64, width=64))
    for split, part in (("train", samples[:4]), ("val", samples[4:])):
        with tf.io.TFRecordWriter(str(tmp_path / f"{split}-00000-of-00001.tfrecord")) as out:
            for i, sample in enumerate(part):
                out.write(model_garden_example(sample, 100 + i))
    return tmp_path


def test_records_with_model_garden_keys_only_decode(model_garden_folder):
    sample = next(shapes.generate(6, seed=4, height=64, width=64))
    [record] = list(tf.data.TFRecordDataset(
        str(model_garden_folder / "train-00000-of-00001.tfrecord")).take(1))
    example = tfrecord.decode_example(record)
    n = len(sample.class_ids)
    np.testing.assert_array_equal(example["masks"].numpy(), sample.masks)
    np.testing.assert_array_equal(example["class_ids"].numpy(), sample.class_ids)
    assert example["is_crowd"].numpy().tolist() == [False] * n  # absent: no crowd regions
    assert example["area"].numpy().tolist() == [0.0] * n
    assert example["source"].numpy() == b"" and example["source_id"].numpy() == b"100"


def test_a_folder_of_model_garden_shards_trains_without_dataset_json(model_garden_folder):
    info = read_dataset_info(str(model_garden_folder))
    assert info["splits"] == {
        "train": {"images": None, "shards": ["train-00000-of-00001.tfrecord"]},
        "val": {"images": None, "shards": ["val-00000-of-00001.tfrecord"]}}
    assert info["class_names"] is None  # NUM_CLASSES is taken as given
    config = Config.from_yaml(ROOT / "configs" / "demo.yaml",
                              ["IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64"])
    batch = next(iter(training_dataset(str(model_garden_folder), config, shuffle=False)))
    assert batch["input_image"].shape[:3] == (config.BATCH_SIZE, 64, 64)
    labels = batch["input_gt_class_ids"].numpy()
    assert labels.max() <= 3 and (labels > 0).sum() > 0


def test_a_folder_of_neither_kind_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not shards")
    with pytest.raises(UserError, match="no dataset.json and no shards named"):
        read_dataset_info(str(tmp_path))
