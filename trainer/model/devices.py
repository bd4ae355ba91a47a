"""Whether a GPU or TPU is present: the CPU-only execution paths (conv.py, time_distributed.py)
step aside there, since cuDNN's and XLA's kernels do not share oneDNN's weak spots."""

from __future__ import annotations

import functools

import tensorflow as tf


@functools.cache
def accelerator_present() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
