"""Importing `trainer` turns TensorFlow's oneDNN rewrite on (TensorFlow leaves it off on
AVX2-only CPUs), and leaves a user's explicit choice alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A convolution in a graph, with oneDNN's verbose log on: its primitives print one
# "onednn_verbose,...,exec,cpu,convolution,..." line each time they run.
PROGRAM = """
import trainer
import tensorflow as tf
conv = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
conv(tf.ones([1, 8, 8, 4]), tf.ones([3, 3, 4, 4]))
"""


def _convolution_primitives_run(env_value: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["ONEDNN_VERBOSE"] = "1"
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    return any(",exec," in line and ",convolution," in line
               for line in result.stdout.splitlines())


@pytest.mark.parametrize(("env_value", "expected"), [(None, True), ("1", True), ("0", False)])
def test_trainer_turns_onednn_convolutions_on_unless_told_not_to(env_value, expected):
    assert _convolution_primitives_run(env_value) is expected
