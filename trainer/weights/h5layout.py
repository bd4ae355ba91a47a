"""The Keras-2 h5 weights layout by layer name (matterport's `mask_rcnn_coco.h5`): read and write.

Layout (all strings stored as bytes):

    /                     attrs layer_names [L] bytes, backend b"tensorflow", keras_version
    /{layer}              attrs weight_names [W] bytes, e.g. b"conv1/kernel:0"
    /{layer}/{weight}     dataset, e.g. /conv1/conv1/kernel:0 float32 [3, 3, 3, 64]

Full-model files keep the same tree (and the root attributes) under a `model_weights` group.
Layers without weights are listed in `layer_names` with an empty `weight_names`.

Only h5py datasets and attributes are read: nothing in the file is executed or unpickled, and
nothing outside it is read: external storage, virtual datasets, external and soft links are
refused (a dataset's bytes could otherwise come from any local file), as are names that are
not UTF-8.
This module knows nothing about Keras models; `trainer.weights.by_name` maps a layout onto a model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from trainer.errors import WeightsFileError
from trainer.io.atomic import atomic_path

# HDF5 keeps attributes in an object header limited to 64 KiB; Keras 2 split longer attribute
# arrays into numbered chunks (`layer_names0`, `layer_names1`, ...). Stay well below the limit.
_ATTR_CHUNK_BYTES = 64_000
FULL_MODEL_GROUP = "model_weights"
RESERVED_ROOT_ATTRS = ("layer_names", "backend", "keras_version")


@dataclass(frozen=True)
class WeightEntry:
    """One stored array: its name as written (`conv1/kernel:0`), shape and dtype (`float32`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class FileLayout:
    """What a weights file holds, read without loading arrays.

    `layers` maps every name in `layer_names`, in file order (Keras topological order), to its
    ordered weights; weightless layers map to an empty list. `group` is "/" or "/model_weights".
    """

    path: str
    group: str
    keras_version: str
    backend: str
    layers: dict[str, list[WeightEntry]]

    @property
    def weighted_layers(self) -> list[str]:
        """Names of the layers that store at least one array, in file order."""
        return [name for name, entries in self.layers.items() if entries]


# === Reading ===


def _text(value: object) -> str:
    """An attribute value written as bytes (Keras 2) or as a str (h5py vlen) -> str.
    Names that are not UTF-8 raise UnicodeDecodeError (see _damaged), whichever way h5py
    hands them over: as bytes, or as a str carrying surrogate escapes."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = text.encode("utf-8", "surrogateescape")
        raise UnicodeDecodeError("utf-8", raw, err.start, err.end, "invalid start byte"
                                 ) from None
    return text


def _member(group: h5py.Group, name: str, path: str) -> h5py.Group | h5py.Dataset | None:
    """`group[name]` when it is stored in this file itself; None when absent. Anything that
    would make h5py read another file or place refuses the whole file."""
    link = group.get(name, getlink=True)
    if link is None:
        return None
    where = f"{group.name.rstrip('/')}/{name}"
    if not isinstance(link, h5py.HardLink):
        kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
        raise WeightsFileError(_refused(path, f"{where} is {kind}"))
    member = group[name]
    if isinstance(member, h5py.Dataset):
        if member.is_virtual:
            raise WeightsFileError(_refused(path, f"{where} is a virtual dataset"))
        if member.external:
            raise WeightsFileError(_refused(path, f"{where} uses external storage"))
    return member


def _refused(path: str, what: str) -> str:
    return (f"{path} is refused: {what}, whose data would be read from outside the file; "
            "weights files must hold their arrays themselves (save it again with "
            "trainer.weights.by_name.save_weights or h5py without links)")


def _damaged(path: str, err: Exception) -> str:
    """The one-line reason for metadata that cannot be read (corrupt, or names not UTF-8)."""
    if isinstance(err, UnicodeDecodeError):
        return (f"{path} has a layer or weight name that is not UTF-8 text ({err.reason} at "
                f"byte {err.start}); it was not written by Keras: use the original file")
    return _corrupt_message(path, err)


def _read_string_list(attrs: h5py.AttributeManager, name: str) -> list[str] | None:
    """A list-of-strings attribute, joining Keras 2's numbered chunks; None when absent."""
    if name in attrs:
        return [_text(v) for v in np.atleast_1d(attrs[name])]
    if f"{name}0" not in attrs:
        return None
    values: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in attrs:
        values.extend(_text(v) for v in np.atleast_1d(attrs[f"{name}{chunk}"]))
        chunk += 1
    return values


def _describe_not_keras(path: str, f: h5py.File) -> str:
    if "layers" in f and "vars" in f:
        # Keras 3 `.weights.h5` stores weights by object path (`layers/conv2d/vars/0`).
        return (f"{path} is a Keras 3 .weights.h5 file (weights by object path), not the "
                "Keras-2 layout by layer name; save it with trainer.weights.save_weights")
    return (f"{path} is an HDF5 file without the Keras weights layout (no `layer_names` "
            f"attribute at the root or in `{FULL_MODEL_GROUP}`); expected a Keras .h5 weights "
            "file such as mask_rcnn_coco.h5")


@contextlib.contextmanager
def open_weights_group(path: str | os.PathLike) -> Iterator[h5py.Group]:
    """Open `path` read-only and yield the group holding `layer_names` (root or model_weights).

    Raises WeightsFileError (one line) when the file is missing, not HDF5, truncated/corrupt,
    or has no Keras layout.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"weights file {path} does not exist (or is not a file)")
    if not h5py.is_hdf5(path):
        raise WeightsFileError(
            f"{path} is not an HDF5 file; expected a Keras .h5 weights file such as "
            "mask_rcnn_coco.h5 (a .keras zip or a TF checkpoint is not supported)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise WeightsFileError(_corrupt_message(path, err)) from err
    with f:
        if "layer_names" in f.attrs or "layer_names0" in f.attrs:
            yield f
            return
        try:
            group = _member(f, FULL_MODEL_GROUP, path)
        except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as err:
            raise WeightsFileError(_damaged(path, err)) from err
        if isinstance(group, h5py.Group) and ("layer_names" in group.attrs
                                              or "layer_names0" in group.attrs):
            yield group
        else:
            raise WeightsFileError(_describe_not_keras(path, f))


def _corrupt_message(path: str, err: Exception) -> str:
    detail = " ".join(str(err).split())  # h5py messages may span lines; the CLI prints one
    return (f"{path} is a truncated or corrupt HDF5 file ({detail}); download or copy it "
            "again")


def _layer_entries(group: h5py.Group, layer: str, path: str) -> list[WeightEntry]:
    layer_group = _member(group, layer, path)
    if not isinstance(layer_group, h5py.Group):
        raise WeightsFileError(f"{path} is corrupt: layer {layer!r} is listed in layer_names "
                               "but has no group")
    names = _read_string_list(layer_group.attrs, "weight_names") or []
    entries = []
    for name in names:
        dataset = _member(layer_group, name, path)
        if not isinstance(dataset, h5py.Dataset):
            raise WeightsFileError(f"{path} is corrupt: weight {name!r} of layer {layer!r} is "
                                   "listed in weight_names but has no dataset")
        entries.append(WeightEntry(name, tuple(int(d) for d in dataset.shape),
                                   str(dataset.dtype)))
    return entries


def read_layout(path: str | os.PathLike) -> FileLayout:
    """Read layer names, weight names, shapes and dtypes of `path` (no arrays are loaded)."""
    path = os.fspath(path)
    with open_weights_group(path) as group:
        try:
            layer_names = _read_string_list(group.attrs, "layer_names") or []
            layers = {name: _layer_entries(group, name, path) for name in layer_names}
            keras_version = _text(group.attrs.get("keras_version", b"unknown"))
            backend = _text(group.attrs.get("backend", b"unknown"))
        except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as err:  # damaged metadata
            raise WeightsFileError(_damaged(path, err)) from err
        return FileLayout(path, group.name, keras_version, backend, layers)


def read_arrays(path: str | os.PathLike,
                layer_names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Load the arrays of `layer_names`, each list in the file's weight order.

    Everything is read before returning, so a file that turns out to be truncated fails here
    rather than halfway through assigning weights to a model.
    """
    path = os.fspath(path)
    with open_weights_group(path) as group:
        arrays: dict[str, list[np.ndarray]] = {}
        try:
            for layer in layer_names:
                layer_group = _member(group, layer, path)
                if not isinstance(layer_group, h5py.Group):
                    raise KeyError(f"layer {layer!r} has no group")
                names = _read_string_list(layer_group.attrs, "weight_names") or []
                arrays[layer] = []
                for name in names:
                    dataset = _member(layer_group, name, path)
                    if not isinstance(dataset, h5py.Dataset):
                        raise KeyError(f"weight {name!r} of layer {layer!r} has no dataset")
                    arrays[layer].append(np.asarray(dataset[()]))
        except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as err:
            raise WeightsFileError(_damaged(path, err)) from err
        return arrays


# === Writing ===


def _write_string_list(attrs: h5py.AttributeManager, name: str, values: Sequence[str]) -> None:
    """Write strings as a fixed-length bytes array (what Keras 2 reads), chunked if long."""
    encoded = [v.encode("utf-8") for v in values]
    width = max((len(v) for v in encoded), default=1) or 1
    per_chunk = max(1, _ATTR_CHUNK_BYTES // width)
    if len(encoded) <= per_chunk:
        attrs[name] = np.array(encoded, dtype=f"S{width}")
        return
    for chunk, start in enumerate(range(0, len(encoded), per_chunk)):
        attrs[f"{name}{chunk}"] = np.array(encoded[start:start + per_chunk], dtype=f"S{width}")


def _write_layer_group(root: h5py.Group, layer: str,
                       weights: Sequence[tuple[str, np.ndarray]]) -> None:
    group = root.create_group(layer)
    _write_string_list(group.attrs, "weight_names", [name for name, _ in weights])
    for name, array in weights:
        group.create_dataset(name, data=array)


def write_layout(path: str | os.PathLike,
                 layers: Mapping[str, Sequence[tuple[str, np.ndarray]]],
                 *, keras_version: str, backend: str = "tensorflow",
                 extra_attrs: Mapping[str, object] | None = None) -> None:
    """Write `layers` ({layer: [(weight_name, array), ...]}, in model order) atomically.

    Written with `atomic_path`: readers see the old file or the complete new one, never a
    partial one (a checkpoint interrupted by preemption must not shadow the last good one).
    """
    path = os.fspath(path)
    extra_attrs = dict(extra_attrs or {})
    clash = sorted(set(extra_attrs) & set(RESERVED_ROOT_ATTRS))
    if clash:
        raise ValueError(f"extra_attrs may not override the layout attributes {clash}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_string_list(f.attrs, "layer_names", list(layers))
        f.attrs["backend"] = np.bytes_(backend.encode("utf-8"))
        f.attrs["keras_version"] = np.bytes_(keras_version.encode("utf-8"))
        for key, value in extra_attrs.items():
            f.attrs[key] = value
        for layer, weights in layers.items():
            _write_layer_group(f, layer, weights)
