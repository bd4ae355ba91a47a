"""Training data held in memory (generated shapes, a test's fixtures) as a batched tf.data.

The samples become tensors once (each field's arrays flattened into one ragged tensor, with
their shapes beside it) and are sliced from there. Not `Dataset.from_generator`: on Python 3.11
TensorFlow's generator dataset sets glibc's mmap threshold to 128 KB for the whole process
(`mallopt(M_MMAP_THRESHOLD)` in the op's constructor, a workaround for heap growth), after which
every larger allocation is a fresh mmap whose pages fault on first touch: ~100,000 page faults
and 0.3 CPU-seconds of kernel time per 256 px training step, measured here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
    images, image_shapes = _flattened([s.image for s in samples], np.uint8)
    masks, mask_shapes = _flattened([s.masks for s in samples], bool)
    class_ids, _ = _flattened([s.class_ids for s in samples], np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((
        tf.range(len(samples), dtype=tf.int32), images, image_shapes, masks, mask_shapes,
        class_ids))
    if shuffle:
        dataset = dataset.shuffle(len(samples), reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    channels = config.IMAGE_CHANNEL_COUNT

    def example(i, image, image_shape, mask, mask_shape, ids):
        image = tf.ensure_shape(tf.reshape(image, image_shape), [None, None, channels])
        mask = tf.ensure_shape(tf.reshape(mask, mask_shape), [None, None, None])
        return training_example(image, mask, ids, config, anchors, image_id=i)

    dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE).filter(has_objects)
    return dataset.batch(config.BATCH_SIZE, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _flattened(arrays: Sequence, dtype) -> tuple[tf.RaggedTensor, tf.Tensor]:
    """Arrays of any shapes -> (a ragged [len(arrays), (size)] of their flattened values, their
    shapes int32 [len(arrays), rank])."""
    arrays = [np.asarray(a, dtype) for a in arrays]
    values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
    flat = tf.RaggedTensor.from_row_lengths(values, [a.size for a in arrays])
    return flat, tf.constant([a.shape for a in arrays], tf.int32)
