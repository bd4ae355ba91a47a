"""Load and save Keras-2 h5 weights (matterport's `mask_rcnn_coco.h5`) into our Keras 3 model.

Matching follows Keras 2's `load_weights_from_hdf5_group_by_name`, which matterport used: a file
layer feeds the model's TOP-LEVEL layer of the same name. A nested model (`rpn_model`) is one
layer holding all its sub-layers' weights; a TimeDistributed wrapper holds its inner layer's
weights. Within a layer, weights pair by name when file and model use the same names, else by
position (Keras 2 ordered a nested model's trainable weights before its non-trainable ones;
Keras 3 orders them per sub-layer, so names are the safer key when they agree).

Every load is validated first (`inspect_weights`): a shape or weight-count mismatch in a layer
that is not excluded fails before any weight changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from trainer.errors import UserError
from trainer.weights.h5layout import FileLayout, WeightEntry, read_arrays, read_layout, write_layout

# Layers whose shapes depend on NUM_CLASSES; matterport's samples exclude these four when
# fine-tuning COCO weights (`mrcnn_bbox` is a weightless Reshape, excluded by habit).
CLASS_SPECIFIC_LAYERS = ("mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask")


class WeightsMismatchError(UserError, ValueError):
    """The weights file does not fit the model (shapes or weight counts differ)."""


# === The model's layout ===


@dataclass(frozen=True)
class ModelLayer:
    """A top-level layer holding weights: its variables in Keras order and their file names."""

    name: str
    variables: list[keras.Variable]
    weight_names: list[str]  # matterport style, e.g. "rpn_conv_shared/kernel:0"

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in v.shape) for v in self.variables]


def _owner_names(layer: keras.layers.Layer) -> dict[int, str]:
    """id(variable) -> the layer name Keras 2 put in front of it.

    Inside a nested model that is the sub-layer's name (`rpn_conv_shared/kernel:0`); a wrapper
    such as TimeDistributed lends its own name to its inner layer (`mrcnn_mask/kernel:0`).
    """
    if isinstance(layer, keras.Model):
        names: dict[int, str] = {}
        for sub_layer in layer.layers:
            names.update(_owner_names(sub_layer))
        return names
    return {id(v): layer.name for v in layer.weights}


def _model_layer(layer: keras.layers.Layer) -> ModelLayer:
    owners = _owner_names(layer)
    variables = list(layer.weights)
    names = [f"{owners.get(id(v), layer.name)}/{v.name}:0" for v in variables]
    if len(set(names)) != len(names):
        # A custom layer with several sub-layers ("kernel" twice): Keras 3's variable paths
        # are unique where short names are not.
        names = [f"{v.path}:0" for v in variables]
    return ModelLayer(layer.name, variables, names)


def model_layout(keras_model: keras.Model) -> list[ModelLayer]:
    """The model's top-level layers that hold weights, in `keras_model.layers` order."""
    layers = [_model_layer(layer) for layer in keras_model.layers]
    return [layer for layer in layers if layer.variables]


def weight_names(keras_model: keras.Model, variables) -> list[str]:
    """matterport-style names ("rpn_conv_shared/kernel:0") of `variables`: stable across
    processes, unlike Keras' auto-numbered paths of wrapped layers."""
    by_id = {id(v): name for layer in model_layout(keras_model)
             for v, name in zip(layer.variables, layer.weight_names, strict=True)}
    return [by_id[id(v)] for v in variables]


# === The report ===


@dataclass(frozen=True)
class ShapeMismatch:
    layer: str
    weight: str  # the file's weight name
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass(frozen=True)
class CountMismatch:
    layer: str
    file_count: int
    model_count: int


@dataclass
class WeightsReport:
    """How a weights file maps onto a model. Layer lists hold layer names, sorted.

    With by_name=False, layers pair by position; `matched` then names the model's layers, and
    `missing_in_file` / `unused_in_file` are the surplus at the end of either list.
    """

    path: str
    keras_version: str
    backend: str
    by_name: bool
    matched: list[str] = field(default_factory=list)
    missing_in_file: list[str] = field(default_factory=list)  # weighted model layers
    unused_in_file: list[str] = field(default_factory=list)  # weighted file layers
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    count_mismatches: list[CountMismatch] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # exclude names found in file or model
    exclude_unmatched: list[str] = field(default_factory=list)  # exclude names found nowhere
    file_weight_count: int = 0  # arrays in the file
    model_weight_count: int = 0  # variables in the model
    loaded_weight_count: int = 0  # arrays assigned (by inspect: once mismatches are excluded)

    @property
    def mismatched_layers(self) -> list[str]:
        layers = {m.layer for m in self.shape_mismatches} | {m.layer for m in self.count_mismatches}
        return sorted(layers)

    @property
    def ok(self) -> bool:
        """True when load_weights would proceed."""
        positional_surplus = not self.by_name and (self.missing_in_file or self.unused_in_file)
        return not (self.mismatched_layers or positional_surplus)

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""
        out = asdict(self)
        for item in out["shape_mismatches"]:
            item["file_shape"] = list(item["file_shape"])
            item["model_shape"] = list(item["model_shape"])
        out["mismatched_layers"] = self.mismatched_layers
        out["ok"] = self.ok
        return out

    def raise_for_mismatch(self, exclude: Iterable[str] = ()) -> None:
        """Raise WeightsMismatchError (one line, with the exclude list that fixes it) unless ok.

        `exclude` is the list the caller already passes; the suggestion extends it.
        """
        if self.ok:
            return
        if not self.by_name and not self.mismatched_layers:
            n_file = len(self.matched) + len(self.unused_in_file)
            n_model = len(self.matched) + len(self.missing_in_file)
            raise WeightsMismatchError(
                f"{self.path} has {n_file} layers with weights but the model has {n_model}; "
                "by_name=False pairs layers by position and needs equal counts: use by_name=True")
        raise WeightsMismatchError(self._mismatch_message(list(exclude)))

    def _mismatch_message(self, exclude: list[str]) -> str:
        first_per_layer = {m.layer: m for m in reversed(self.shape_mismatches)}  # keeps first
        details = [f"{m.layer} ({m.weight}: file {m.file_shape} vs model {m.model_shape})"
                   for m in self.shape_mismatches if first_per_layer[m.layer] is m]
        details += [f"{m.layer} (weight count: file {m.file_count} vs model {m.model_count})"
                    for m in self.count_mismatches]
        shown = ", ".join(details[:4]) + (f" and {len(details) - 4} more" if len(details) > 4
                                           else "")
        layers = set(self.mismatched_layers)
        if layers <= set(CLASS_SPECIFIC_LAYERS):
            fix = sorted(set(exclude) | set(CLASS_SPECIFIC_LAYERS))
            hint = f"if the file was trained for another NUM_CLASSES, load with exclude={fix}"
        else:
            fix = sorted(set(exclude) | layers)
            hint = (f"load with exclude={fix} to skip them, or use weights of the same "
                    "architecture")
        return f"{self.path} does not fit the model: {shown}; {hint}"


# === Matching ===


@dataclass(frozen=True)
class _Assignment:
    """Copy file layer `file_layer`'s arrays into `model_layer`: (file index, model index)."""

    model_layer: ModelLayer
    file_layer: str
    pairs: list[tuple[int, int]]


def _align(entries: list[WeightEntry], layer: ModelLayer) -> list[tuple[int, int]]:
    """Pair file weights with model weights: by name when the name sets agree, else by order."""
    file_names = [e.name for e in entries]
    if sorted(file_names) == sorted(layer.weight_names) and len(set(file_names)) == len(entries):
        model_index = {name: i for i, name in enumerate(layer.weight_names)}
        return [(i, model_index[name]) for i, name in enumerate(file_names)]
    return [(i, i) for i in range(len(entries))]


def _compare(report: WeightsReport, entries: list[WeightEntry], layer: ModelLayer,
             file_layer: str) -> _Assignment | None:
    """Record `layer` as matched (returning its assignment) or record its mismatches."""
    if len(entries) != len(layer.variables):
        report.count_mismatches.append(
            CountMismatch(layer.name, len(entries), len(layer.variables)))
        return None
    pairs = _align(entries, layer)
    model_shapes = layer.shapes
    shape_mismatches = [ShapeMismatch(layer.name, entries[i].name, entries[i].shape,
                                      model_shapes[j])
                        for i, j in pairs if entries[i].shape != model_shapes[j]]
    if shape_mismatches:
        report.shape_mismatches.extend(shape_mismatches)
        return None
    report.matched.append(layer.name)
    return _Assignment(layer, file_layer, pairs)


def _pair_layers(layout: FileLayout, model_layers: list[ModelLayer],
                 by_name: bool) -> tuple[list[tuple[str, ModelLayer]], list[str], list[str]]:
    """(file layer, model layer) pairs, plus model layers without a file layer, and vice versa."""
    file_layers = layout.weighted_layers
    if by_name:
        by_layer = {layer.name: layer for layer in model_layers}
        pairs = [(name, by_layer[name]) for name in file_layers if name in by_layer]
        missing = [layer.name for layer in model_layers if not layout.layers.get(layer.name)]
        unused = [name for name in file_layers if name not in by_layer]
        return pairs, missing, unused
    pairs = list(zip(file_layers, model_layers))
    missing = [layer.name for layer in model_layers[len(file_layers):]]
    return pairs, missing, file_layers[len(model_layers):]


def parse_exclude(exclude: Iterable[str] | str) -> list[str]:
    """Layer names from a list and/or comma-separated strings ("a,b"), blanks dropped (a bare
    string is one list item, never iterated character by character)."""
    items = [exclude] if isinstance(exclude, str) else list(exclude)
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]


def _plan(layout: FileLayout, model_layers: list[ModelLayer], by_name: bool,
          exclude: Iterable[str]) -> tuple[WeightsReport, list[_Assignment]]:
    excluded = set(parse_exclude(exclude))
    known = set(layout.layers) | {layer.name for layer in model_layers}
    report = WeightsReport(
        path=layout.path, keras_version=layout.keras_version, backend=layout.backend,
        by_name=by_name, excluded=sorted(excluded & known),
        exclude_unmatched=sorted(excluded - known),
        file_weight_count=sum(len(entries) for entries in layout.layers.values()),
        model_weight_count=sum(len(layer.variables) for layer in model_layers))
    pairs, missing, unused = _pair_layers(layout, model_layers, by_name)
    report.missing_in_file = sorted(set(missing) - excluded)
    report.unused_in_file = sorted(set(unused) - excluded)
    assignments = []
    for file_layer, model_layer in pairs:
        if file_layer in excluded or model_layer.name in excluded:
            continue
        assignment = _compare(report, layout.layers[file_layer], model_layer, file_layer)
        if assignment is not None:
            assignments.append(assignment)
    report.matched.sort()
    report.loaded_weight_count = sum(len(a.pairs) for a in assignments)
    return report, assignments


# === Public API ===


def inspect_weights(path: str | os.PathLike, keras_model: keras.Model,
                    exclude: Iterable[str] = (), *, by_name: bool = True) -> WeightsReport:
    """Compare a weights file with a model without changing the model or loading arrays."""
    report, _ = _plan(read_layout(path), model_layout(keras_model), by_name, exclude)
    return report


def load_weights(keras_model: keras.Model, path: str | os.PathLike, by_name: bool = True,
                 exclude: Iterable[str] = ()) -> WeightsReport:
    """Assign the file's weights to `keras_model` (matterport's `load_weights` semantics).

    by_name=True: file layer -> top-level model layer of the same name; layers on one side only
    are skipped and listed in the report. by_name=False: weighted layers pair in order and the
    counts must be equal. `exclude` names layers to leave untouched (e.g. CLASS_SPECIFIC_LAYERS).
    Raises WeightsFileError for an unreadable file and WeightsMismatchError, before any weight
    changes, for a mismatch outside `exclude`.
    """
    exclude = parse_exclude(exclude)
    report, assignments = _plan(read_layout(path), model_layout(keras_model), by_name, exclude)
    report.raise_for_mismatch(exclude)
    # Read everything first: a truncated file must fail before the model is half-loaded.
    arrays = read_arrays(path, [a.file_layer for a in assignments])
    for assignment in assignments:
        variables = assignment.model_layer.variables
        for file_index, model_index in assignment.pairs:
            variable = variables[model_index]
            variable.assign(np.asarray(arrays[assignment.file_layer][file_index],
                                       dtype=variable.dtype))
    return report


def save_weights(keras_model: keras.Model, path: str | os.PathLike, *,
                 extra_attrs: dict[str, object] | None = None) -> None:
    """Write the model's weights atomically in the Keras-2 layout that `load_weights` reads.

    Every top-level layer gets a group (weightless ones with an empty `weight_names`, as Keras 2
    wrote them), so matterport's Keras 2 code can load the file too. `extra_attrs` (str keys,
    h5py-storable values) are added as root attributes, e.g. the epoch of a checkpoint.
    """
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    for layer in keras_model.layers:
        model_layer = _model_layer(layer)
        if len(set(model_layer.weight_names)) != len(model_layer.weight_names):
            raise ValueError(f"layer {layer.name} has duplicate weight names "
                             f"{model_layer.weight_names}; rename its sub-layers")
        layers[layer.name] = [(name, keras.ops.convert_to_numpy(variable))
                              for name, variable in zip(model_layer.weight_names,
                                                        model_layer.variables)]
    write_layout(path, layers, keras_version=keras.__version__,
                 backend=keras.backend.backend(), extra_attrs=extra_attrs)


def format_report(report: WeightsReport) -> str:
    """A human-readable summary for `mrcnn weights inspect` (several lines, no trailing \\n)."""
    lines = [
        f"weights file   {report.path}",
        f"written by     keras {report.keras_version}, backend {report.backend}",
        f"matching       {'by layer name' if report.by_name else 'by layer position'}",
        f"weights        file {report.file_weight_count}, model {report.model_weight_count}, "
        f"loaded {report.loaded_weight_count}",
        f"status         {'OK' if report.ok else 'MISMATCH'}",
        "",
        f"{'layers':<18}{'count':>6}  names",
    ]
    groups = [("matched", report.matched), ("excluded", report.excluded),
              ("mismatched", report.mismatched_layers),
              ("missing in file", report.missing_in_file),
              ("unused in file", report.unused_in_file),
              ("exclude unknown", report.exclude_unmatched)]
    for title, names in groups:
        shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
        lines.append(f"{title:<18}{len(names):>6}  {shown}".rstrip())
    if report.shape_mismatches or report.count_mismatches:
        lines += ["", f"{'layer':<24}{'weight':<40}{'file':<20}model"]
        lines += [f"{m.layer:<24}{m.weight:<40}{str(m.file_shape):<20}{m.model_shape}"
                  for m in report.shape_mismatches]
        lines += [f"{m.layer:<24}{'(weight count)':<40}{m.file_count:<20}{m.model_count}"
                  for m in report.count_mismatches]
    return "\n".join(lines)
