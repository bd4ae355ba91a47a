"""Shared test setup: quiet TensorFlow, deterministic seeds, tiny configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture
def demo_config():
    from trainer.config import Config

    return Config.from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
