"""tf.data pipelines over prepared shards: decode -> transforms -> skip examples left without a
non-crowd object (as matterport) -> batch -> prefetch.

`training_dataset` and `evaluation_dataset` yield the model's training inputs (dicts keyed
`input_image`, `input_image_meta`, `input_rpn_match`, ...; see `transforms.training_example`),
batched by BATCH_SIZE with the remainder dropped. `examples` yields the decoded examples
themselves (original size) for detection-based evaluation.

In 'square' and 'crop' resize modes every example has the same output size, as batching needs.
`data_dir` is a local folder (the pipeline's dataset artifact); gs:// works only where
TensorFlow's own GCS filesystem has credentials (it ignores STORAGE_EMULATOR_HOST).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import tensorflow as tf

from trainer.config import Config
from trainer.data import tfrecord
from trainer.data.transforms import has_objects, training_example
from trainer.errors import StorageError, UserError
from trainer.io import storage
from trainer.model.anchors import anchors_for_image

MODEL_GARDEN_SHARD = re.compile(r"(?P<split>[A-Za-z0-9_]+?)-\d{5}-of-\d{5}(\.tfrecord)?")
SHUFFLE_BUFFER = 512  # examples; shards are also read in shuffled, interleaved order
Augmentation = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def read_dataset_info(data_dir: str) -> dict:
    """dataset.json of a prepared dataset folder (local path or gs://); for a folder of shards
    written by TF Model Garden's converters (no dataset.json), what their names tell (see
    `model_garden_info`)."""
    root = str(data_dir).rstrip("/")
    try:
        text = storage.read_bytes(f"{root}/dataset.json")
    except StorageError:
        info = model_garden_info(root)
        if info is None:
            raise UserError(f"{data_dir} is not a prepared dataset: no dataset.json and no "
                            "shards named SPLIT-NNNNN-of-NNNNN.tfrecord (run `mrcnn data "
                            "prepare`)") from None
        return info
    try:
        return json.loads(text)
    except ValueError as err:
        raise UserError(f"{data_dir}/dataset.json is not valid JSON ({err}): run "
                        "`mrcnn data prepare` again") from err


def model_garden_info(data_dir: str) -> dict | None:
    """A dataset.json's worth of facts about shards named as Model Garden's converters name
    them (`{split}-NNNNN-of-NNNNN.tfrecord`, the split a file-name prefix such as train or
    val): the splits and their shards; the image counts and class names are unknown (None),
    so NUM_CLASSES is taken as given and the names default to class_1, ... (None) when none
    exists in the folder. None when the folder holds no such shard."""
    splits: dict[str, dict] = {}
    for uri in storage.list_uris(data_dir if data_dir.startswith("gs://") else data_dir):
        name = uri.rsplit("/", 1)[-1]
        found = MODEL_GARDEN_SHARD.fullmatch(name)
        if found:
            split = {"validation": "val"}.get(found["split"], found["split"])
            splits.setdefault(split, {"images": None, "shards": []})["shards"].append(name)
    if not splits:
        return None
    return {"splits": splits, "class_names": None,
            "source": {"name": "model_garden", "folder": data_dir}}


def shard_paths(data_dir: str, split: str, info: dict | None = None) -> list[str]:
    """The split's shard files; a UserError when the split is unknown or holds no image."""
    info = info if info is not None else read_dataset_info(data_dir)
    if split not in info["splits"]:
        raise UserError(f"{data_dir} has no split {split!r}; it has {sorted(info['splits'])}")
    if info["splits"][split]["images"] == 0:  # None: not counted (Model Garden shards)
        raise UserError(f"the {split} split of {data_dir} is empty: prepare more images or a "
                        "larger --val-fraction")
    return [f"{str(data_dir).rstrip('/')}/{name}" for name in info["splits"][split]["shards"]]


def examples(data_dir: str, split: str = "val") -> tf.data.Dataset:
    """The decoded examples of a split, in shard order (see `tfrecord.decode_example`)."""
    return tfrecord.read_examples(shard_paths(data_dir, split))


def check_classes(data_dir: str, info: dict, config: Config) -> None:
    """A UserError when the config's NUM_CLASSES is not the dataset's class count (unknown for
    Model Garden shards: NUM_CLASSES is taken as given)."""
    names = info["class_names"]
    if names is not None and config.NUM_CLASSES != len(names):
        raise UserError(f"NUM_CLASSES={config.NUM_CLASSES} but {data_dir} has {len(names)} "
                        f"classes {names} (background included): set NUM_CLASSES="
                        f"{len(names)}")


def _model_inputs(
    config: Config,
    augmentation: Augmentation | None,
    no_augmentation_sources: Sequence[str] | None,
) -> Callable[[tf.Tensor], dict]:
    anchors = tf.constant(anchors_for_image(config, config.IMAGE_SHAPE), tf.float32)
    skip_sources = tf.constant(list(no_augmentation_sources or []), tf.string)

    def to_inputs(serialized: tf.Tensor) -> dict:
        example = tfrecord.decode_example(serialized)
        augment = None
        if augmentation is not None:
            use = tf.logical_not(tf.reduce_any(tf.equal(example["source"], skip_sources)))

            def augment(image: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                return tf.cond(use, lambda: augmentation(image, masks), lambda: (image, masks))

        # Matterport's convention: crowd regions carry negative class ids.
        class_ids = tf.where(example["is_crowd"], -example["class_ids"], example["class_ids"])
        image_id = tf.strings.to_number(example["source_id"], tf.int32)
        return training_example(example["image"], example["masks"], class_ids, config,
                                anchors, image_id=image_id, augment=augment)

    return to_inputs


def _pipeline(data_dir: str, config: Config, split: str, to_inputs, shuffle: bool,
              repeat: bool) -> tf.data.Dataset:
    info = read_dataset_info(data_dir)
    check_classes(data_dir, info, config)
    files = tf.data.Dataset.from_tensor_slices(shard_paths(data_dir, split, info))
    if shuffle:
        files = files.shuffle(len(info["splits"][split]["shards"]), reshuffle_each_iteration=True)
    records = files.interleave(tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    if shuffle:
        records = records.shuffle(SHUFFLE_BUFFER, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()
    inputs = records.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=not shuffle).filter(has_objects)
    return inputs.batch(config.BATCH_SIZE, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def training_dataset(
    data_dir: str,
    config: Config,
    split: str = "train",
    augmentation: Augmentation | None = None,
    no_augmentation_sources: Sequence[str] | None = None,
    shuffle: bool = True,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batches of training inputs from `data_dir`'s shards.

    augmentation: fn (image uint8 [H, W, C], masks bool [H, W, N]) -> the same, run on the
    resized pair, skipped for examples whose `image/source` is in `no_augmentation_sources`.
    Raises UserError when NUM_CLASSES differs from the dataset's or the split is empty.
    """
    to_inputs = _model_inputs(config, augmentation, no_augmentation_sources)
    return _pipeline(data_dir, config, split, to_inputs, shuffle, repeat)


def evaluation_dataset(
    data_dir: str, config: Config, split: str = "val", repeat: bool = False
) -> tf.data.Dataset:
    """Batches of the same inputs for validation losses: no augmentation, shard order."""
    return _pipeline(data_dir, config, split, _model_inputs(config, None, None), False, repeat)
