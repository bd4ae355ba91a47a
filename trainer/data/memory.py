"""Training data held in memory (generated shapes, a test's fixtures) as a batched tf.data."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from trainer.config import Config
from trainer.data.transforms import has_objects, training_example
from trainer.model.anchors import anchors_for_image


def examples_dataset(samples: Sequence, config: Config, shuffle: bool = True,
                     repeat: bool = True) -> tf.data.Dataset:
    """Batches of model inputs from samples with `image`, `masks` and `class_ids` fields
    (e.g. `shapes.ShapesSample`). The images must share one size in 'square'/'crop' modes'
    output, as every batch does."""
    anchors = tf.constant(anchors_for_image(config, config.IMAGE_SHAPE))

    def generate():
        for i, sample in enumerate(samples):
            yield i, sample.image, sample.masks, sample.class_ids

    channels = config.IMAGE_CHANNEL_COUNT
    dataset = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([None, None, channels], tf.uint8),
        tf.TensorSpec([None, None, None], tf.bool),
        tf.TensorSpec([None], tf.int32),
    )).cache()
    if shuffle:
        dataset = dataset.shuffle(len(samples), reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.map(
        lambda i, image, masks, class_ids: training_example(image, masks, class_ids, config,
                                                            anchors, image_id=i),
        num_parallel_calls=tf.data.AUTOTUNE).filter(has_objects)
    return dataset.batch(config.BATCH_SIZE, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
