"""Shared test setup: quiet TensorFlow, deterministic seeds, tiny configs."""

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# The package before any test module imports TensorFlow: its start-up settings (oneDNN on)
# are the ones `mrcnn` runs with.
import trainer  # noqa: E402, F401
from tests.servers import GcsEmulator, gcs_emulator  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's download cache in its own folder, never in ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MRCNN_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def emulator() -> Iterator[GcsEmulator]:
    """A gcp-storage-emulator on 127.0.0.1 for the whole session (see `gcs`)."""
    with gcs_emulator() as server:
        yield server


@pytest.fixture
def gcs(emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcsEmulator]:
    """The emulator, empty, with STORAGE_EMULATOR_HOST pointing at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    emulator.wipe()
    yield emulator


@pytest.fixture
def demo_config():
    from trainer.config import Config

    return Config.from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
