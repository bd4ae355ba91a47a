"""The distribution strategy a config asks for: one device, or MirroredStrategy over GPU_COUNT."""

from __future__ import annotations

import tensorflow as tf

from trainer.errors import UserError


def distribution_strategy(config) -> tf.distribute.Strategy:
    """MirroredStrategy over GPU_COUNT devices (GPUs, or logical CPUs where there are none),
    or the default strategy for one device."""
    if config.GPU_COUNT == 1:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) < config.GPU_COUNT:
        raise UserError(f"GPU_COUNT={config.GPU_COUNT} but only {len(devices)} device(s) are "
                        "visible: lower GPU_COUNT or request more GPUs")
    return tf.distribute.MirroredStrategy([d.name for d in devices[: config.GPU_COUNT]])
