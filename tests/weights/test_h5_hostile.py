"""Hostile h5 files: data from outside the file, names that are not text. Each is refused
with the one-line weights error before any array is read."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from trainer.errors import WeightsFileError
from trainer.weights.h5layout import read_arrays, read_layout

KERNEL = np.arange(6, dtype=np.float32).reshape(2, 3)


def keras2_file(path: Path, write_kernel, layer: str = "conv1",
                weight: str = "conv1/kernel:0") -> Path:
    """A Keras-2 layout with one layer whose one weight `write_kernel(group, name)` makes."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.encode()], dtype="S")
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        group = f.create_group(layer)
        group.attrs["weight_names"] = np.array([weight.encode()], dtype="S")
        write_kernel(group, weight)
    return path


def external_storage(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(KERNEL.tobytes())  # any local file of the right size
    return lambda group, name: group.create_dataset(
        name, shape=KERNEL.shape, dtype=KERNEL.dtype, external=[(str(secret), 0, KERNEL.nbytes)])


def virtual_dataset(tmp_path):
    source = tmp_path / "other.h5"
    with h5py.File(source, "w") as f:
        f["data"] = KERNEL

    def write(group, name):
        layout = h5py.VirtualLayout(shape=KERNEL.shape, dtype=KERNEL.dtype)
        layout[:] = h5py.VirtualSource(str(source), "data", shape=KERNEL.shape)
        group.create_virtual_dataset(name, layout)

    return write


def external_link(tmp_path):
    source = tmp_path / "other.h5"
    with h5py.File(source, "w") as f:
        f["data"] = KERNEL
    return lambda group, name: group.__setitem__(name, h5py.ExternalLink(str(source), "/data"))


def soft_link(tmp_path):
    def write(group, name):
        group.file["elsewhere"] = KERNEL
        group[name] = h5py.SoftLink("/elsewhere")

    return write


@pytest.mark.parametrize("make, message", [
    (external_storage, "uses external storage"),
    (virtual_dataset, "is a virtual dataset"),
    (external_link, "is an external link"),
    (soft_link, "is a soft link"),
])
def test_data_from_outside_the_file_is_refused(tmp_path, make, message):
    path = keras2_file(tmp_path / "hostile.h5", make(tmp_path))
    for read in (read_layout, lambda p: read_arrays(p, ["conv1"])):
        with pytest.raises(WeightsFileError, match=message) as raised:
            read(path)
        assert "\n" not in str(raised.value) and "refused" in str(raised.value)


def test_a_linked_layer_group_and_model_weights_group_are_refused(tmp_path):
    path = tmp_path / "linked.h5"
    with h5py.File(path, "w") as f:
        target = f.create_group("real")
        target.attrs["layer_names"] = np.array([b"conv1"], dtype="S")
        f["model_weights"] = h5py.SoftLink("/real")
    with pytest.raises(WeightsFileError, match="model_weights is a soft link"):
        read_layout(path)


def test_names_that_are_not_utf8_give_the_one_line_error(tmp_path):
    path = keras2_file(tmp_path / "latin1.h5", lambda g, n: g.create_dataset(n, data=KERNEL))
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = np.array([b"conv\xff1"], dtype="S")
    with pytest.raises(WeightsFileError, match="not UTF-8") as raised:
        read_layout(path)
    assert "\n" not in str(raised.value)
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = np.array([b"conv1"], dtype="S")
        f["conv1"].attrs["weight_names"] = np.array([b"k\xe9rnel"], dtype="S")
    with pytest.raises(WeightsFileError, match="not UTF-8"):
        read_layout(path)


def test_an_ordinary_file_still_reads(tmp_path):
    path = keras2_file(tmp_path / "ok.h5", lambda g, n: g.create_dataset(n, data=KERNEL))
    assert read_layout(path).layers["conv1"][0].shape == (2, 3)
    np.testing.assert_array_equal(read_arrays(path, ["conv1"])["conv1"][0], KERNEL)
