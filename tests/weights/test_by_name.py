"""Keras-2 h5 weights: reading, validation, loading by name into a Keras 3 model, writing.

The reference files are written here with plain h5py in matterport's layout (Keras 2.2.4 names
such as `conv1/kernel:0`), independently of `trainer.weights.h5layout`'s writer.
"""

from __future__ import annotations

import json
import os

import h5py
import keras
import numpy as np
import pytest

from trainer.errors import UserError, WeightsFileError
from trainer.weights import h5layout
from trainer.weights.by_name import (
    CLASS_SPECIFIC_LAYERS,
    WeightsMismatchError,
    format_report,
    inspect_weights,
    load_weights,
    model_layout,
    save_weights,
)

L = keras.layers
ROIS = 2  # ROIs per image in the head inputs


def build_model(num_classes: int) -> keras.Model:
    """A miniature Mask R-CNN with matterport's layer names and wrapper structure."""
    image = keras.Input((8, 8, 3), name="input_image")
    x = L.Conv2D(4, 3, padding="same", name="conv1")(image)
    x = L.BatchNormalization(name="bn_conv1")(x)
    x = L.Activation("relu", name="conv1_relu")(x)
    p5 = L.Conv2D(4, 1, name="fpn_c5p5")(x)
    p2 = L.Conv2D(4, 3, padding="same", name="fpn_p2")(p5)

    rpn_input = keras.Input((None, None, 4), name="input_rpn_feature_map")
    shared = L.Conv2D(6, 3, padding="same", name="rpn_conv_shared")(rpn_input)
    rpn_class = L.Conv2D(2, 1, name="rpn_class_raw")(shared)
    rpn_bbox = L.Conv2D(4, 1, name="rpn_bbox_pred")(shared)
    rpn = keras.Model(rpn_input, [rpn_class, rpn_bbox], name="rpn_model")
    rpn_class_out, rpn_bbox_out = rpn(p2)

    pooled = keras.Input((ROIS, 3, 3, 4), name="input_pooled_rois")
    y = L.TimeDistributed(L.Conv2D(5, 3), name="mrcnn_class_conv1")(pooled)
    y = L.TimeDistributed(L.BatchNormalization(), name="mrcnn_class_bn1")(y)
    y = L.Reshape((ROIS, 5), name="pool_squeeze")(y)
    logits = L.TimeDistributed(L.Dense(num_classes), name="mrcnn_class_logits")(y)
    bbox_fc = L.TimeDistributed(L.Dense(num_classes * 4), name="mrcnn_bbox_fc")(y)
    bbox = L.Reshape((ROIS, num_classes, 4), name="mrcnn_bbox")(bbox_fc)
    mask = L.TimeDistributed(L.Conv2D(num_classes, 1), name="mrcnn_mask")(pooled)
    return keras.Model([image, pooled], [rpn_class_out, rpn_bbox_out, logits, bbox, mask])


def conv(rng: np.random.Generator, name: str, k: int, c_in: int, c_out: int) -> list:
    return [(f"{name}/kernel:0", rng.normal(size=(k, k, c_in, c_out)).astype("float32")),
            (f"{name}/bias:0", rng.normal(size=(c_out,)).astype("float32"))]


def dense(rng: np.random.Generator, name: str, c_in: int, c_out: int) -> list:
    return [(f"{name}/kernel:0", rng.normal(size=(c_in, c_out)).astype("float32")),
            (f"{name}/bias:0", rng.normal(size=(c_out,)).astype("float32"))]


def batch_norm(rng: np.random.Generator, name: str, channels: int) -> list:
    # Distinct, non-default values for all four, so moving statistics are checked too.
    return [(f"{name}/{w}:0", rng.uniform(0.5, 2.0, size=(channels,)).astype("float32"))
            for w in ("gamma", "beta", "moving_mean", "moving_variance")]


def matterport_layers(num_classes: int = 81) -> dict[str, list]:
    """A COCO-like file: no fpn_p2, one layer the model lacks (res2a_branch2a), 81 classes."""
    rng = np.random.default_rng(0)
    return {
        "input_image": [],
        "conv1": conv(rng, "conv1", 3, 3, 4),
        "bn_conv1": batch_norm(rng, "bn_conv1", 4),
        "conv1_relu": [],
        "res2a_branch2a": conv(rng, "res2a_branch2a", 1, 4, 4),
        "fpn_c5p5": conv(rng, "fpn_c5p5", 1, 4, 4),
        "rpn_model": (conv(rng, "rpn_conv_shared", 3, 4, 6) + conv(rng, "rpn_class_raw", 1, 6, 2)
                      + conv(rng, "rpn_bbox_pred", 1, 6, 4)),
        "mrcnn_class_conv1": conv(rng, "mrcnn_class_conv1", 3, 4, 5),
        "mrcnn_class_bn1": batch_norm(rng, "mrcnn_class_bn1", 5),
        "mrcnn_class_logits": dense(rng, "mrcnn_class_logits", 5, num_classes),
        "mrcnn_bbox_fc": dense(rng, "mrcnn_bbox_fc", 5, num_classes * 4),
        "mrcnn_bbox": [],
        "mrcnn_mask": conv(rng, "mrcnn_mask", 1, 4, num_classes),
    }


def write_keras2_h5(path, layers: dict[str, list], full_model: bool = False) -> None:
    """Write `layers` the way Keras 2.2.4's save_weights / model.save did."""
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights") if full_model else f
        if full_model:
            f.attrs["model_config"] = b"{}"  # present in real files; must be ignored
        group.attrs["layer_names"] = np.array([name.encode() for name in layers])
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.2.4"
        for layer, weights in layers.items():
            layer_group = group.create_group(layer)
            layer_group.attrs["weight_names"] = np.array([n.encode() for n, _ in weights])
            for name, array in weights:
                layer_group.create_dataset(name, data=array)


def snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}


def by_layer(model: keras.Model) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {matterport weight name: value}} for the model's weighted layers."""
    return {layer.name: {n: keras.ops.convert_to_numpy(v)
                         for n, v in zip(layer.weight_names, layer.variables)}
            for layer in model_layout(model)}


EXPECTED_MATCHED = ["bn_conv1", "conv1", "fpn_c5p5", "mrcnn_class_bn1", "mrcnn_class_conv1",
                    "rpn_model"]


# === The model's layout ===


def test_model_layout_names_weights_matterport_style():
    model = build_model(3)
    layout = {layer.name: layer.weight_names for layer in model_layout(model)}
    # Weightless layers (inputs, activations, reshapes) left out, Keras's layer order kept.
    assert sorted(layout) == ["bn_conv1", "conv1", "fpn_c5p5", "fpn_p2", "mrcnn_bbox_fc",
                              "mrcnn_class_bn1", "mrcnn_class_conv1", "mrcnn_class_logits",
                              "mrcnn_mask", "rpn_model"]
    assert list(layout) == [layer.name for layer in model.layers if layer.name in layout]
    assert layout["bn_conv1"] == ["bn_conv1/gamma:0", "bn_conv1/beta:0",
                                  "bn_conv1/moving_mean:0", "bn_conv1/moving_variance:0"]
    # Nested model: sub-layer names; TimeDistributed: the wrapper's name, not "conv2d_N".
    assert layout["rpn_model"] == [n for n, _ in matterport_layers()["rpn_model"]]
    assert layout["mrcnn_class_bn1"][3] == "mrcnn_class_bn1/moving_variance:0"


# === Loading matterport's layout ===


@pytest.mark.parametrize("full_model", [False, True], ids=["weights_only", "model_weights"])
def test_load_by_name_with_class_layers_excluded(tmp_path, full_model):
    path = tmp_path / "mask_rcnn_coco.h5"
    file_layers = matterport_layers(num_classes=81)
    write_keras2_h5(path, file_layers, full_model=full_model)
    model = build_model(num_classes=3)
    before = by_layer(model)

    report = load_weights(model, path, by_name=True, exclude=CLASS_SPECIFIC_LAYERS)

    after = by_layer(model)
    for layer in EXPECTED_MATCHED:
        expected = dict(file_layers[layer])
        assert after[layer].keys() == expected.keys()
        for name, value in after[layer].items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    for layer in ["fpn_p2", "mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask"]:
        for name, value in after[layer].items():
            np.testing.assert_array_equal(value, before[layer][name], err_msg=name)

    assert report.matched == EXPECTED_MATCHED
    assert report.missing_in_file == ["fpn_p2"]
    assert report.unused_in_file == ["res2a_branch2a"]
    assert report.shape_mismatches == [] and report.count_mismatches == []
    assert report.excluded == sorted(CLASS_SPECIFIC_LAYERS)  # mrcnn_bbox: weightless, in file
    assert report.exclude_unmatched == []
    assert (report.keras_version, report.backend) == ("2.2.4", "tensorflow")
    # file: 2+4+2+2(res2a)+6+2+4+2+2+2; model: same count with fpn_p2 instead of res2a.
    assert (report.file_weight_count, report.model_weight_count) == (28, 28)
    assert report.loaded_weight_count == 2 + 4 + 2 + 6 + 2 + 4
    assert report.ok
    json.dumps(report.to_dict())  # JSON-ready


def test_inspect_reports_class_head_mismatches_without_loading(tmp_path):
    path = tmp_path / "coco.h5"
    write_keras2_h5(path, matterport_layers(num_classes=81))
    model = build_model(num_classes=3)
    before = snapshot(model)

    report = inspect_weights(path, model, exclude=["typo_layer"])

    assert [(m.layer, m.weight, m.file_shape, m.model_shape)
            for m in report.shape_mismatches] == [
        ("mrcnn_class_logits", "mrcnn_class_logits/kernel:0", (5, 81), (5, 3)),
        ("mrcnn_class_logits", "mrcnn_class_logits/bias:0", (81,), (3,)),
        ("mrcnn_bbox_fc", "mrcnn_bbox_fc/kernel:0", (5, 324), (5, 12)),  # 81*4 vs 3*4
        ("mrcnn_bbox_fc", "mrcnn_bbox_fc/bias:0", (324,), (12,)),
        ("mrcnn_mask", "mrcnn_mask/kernel:0", (1, 1, 4, 81), (1, 1, 4, 3)),
        ("mrcnn_mask", "mrcnn_mask/bias:0", (81,), (3,)),
    ]
    assert report.matched == EXPECTED_MATCHED
    assert report.exclude_unmatched == ["typo_layer"]
    assert not report.ok
    table = format_report(report)
    assert "MISMATCH" in table and "(5, 81)" in table and "typo_layer" in table
    assert all(np.array_equal(v, before[k]) for k, v in snapshot(model).items())


def test_unexcluded_mismatch_raises_before_changing_any_weight(tmp_path):
    path = tmp_path / "coco.h5"
    write_keras2_h5(path, matterport_layers(num_classes=81))
    model = build_model(num_classes=3)
    before = snapshot(model)

    with pytest.raises(WeightsMismatchError) as info:
        load_weights(model, path, exclude=["mrcnn_mask"])

    message = str(info.value)
    assert "\n" not in message
    assert ("mrcnn_class_logits (mrcnn_class_logits/kernel:0: file (5, 81) vs model (5, 3))"
            in message)
    assert "mrcnn_bbox_fc (mrcnn_bbox_fc/kernel:0: file (5, 324)" in message
    assert "mrcnn_mask (" not in message  # excluded by the caller
    assert "exclude=['mrcnn_bbox', 'mrcnn_bbox_fc', 'mrcnn_class_logits', 'mrcnn_mask']" in message
    assert isinstance(info.value, UserError)
    assert all(np.array_equal(v, before[k]) for k, v in snapshot(model).items())


def test_weight_count_mismatch_is_a_mismatch(tmp_path):
    file_layers = matterport_layers(num_classes=3)
    file_layers["bn_conv1"] = file_layers["bn_conv1"][:2]  # gamma, beta only
    path = tmp_path / "short_bn.h5"
    write_keras2_h5(path, file_layers)
    model = build_model(num_classes=3)
    before = snapshot(model)

    report = inspect_weights(path, model)
    assert [(m.layer, m.file_count, m.model_count) for m in report.count_mismatches] == [
        ("bn_conv1", 2, 4)]
    with pytest.raises(WeightsMismatchError, match=r"bn_conv1 \(weight count: file 2 vs model 4\)"
                       r".*exclude=\['bn_conv1'\]"):
        load_weights(model, path)
    assert all(np.array_equal(v, before[k]) for k, v in snapshot(model).items())


def test_nested_model_in_keras2_trainable_first_order_loads_by_weight_name(tmp_path):
    # Keras 2 listed a nested model's trainable weights before its non-trainable ones.
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(3, 1, name="rpn_conv_shared")(inputs)
    x = L.BatchNormalization(name="rpn_bn")(x)
    x = L.Conv2D(2, 1, name="rpn_class_raw")(x)
    nested = keras.Model(inputs, x, name="rpn_model")
    outer_in = keras.Input((4, 4, 2))
    model = keras.Model(outer_in, nested(outer_in))
    rng = np.random.default_rng(1)
    shared, bn, raw = conv(rng, "rpn_conv_shared", 1, 2, 3), batch_norm(rng, "rpn_bn", 3), conv(
        rng, "rpn_class_raw", 1, 3, 2)
    keras2_order = shared + bn[:2] + raw + bn[2:]
    path = tmp_path / "nested.h5"
    write_keras2_h5(path, {"rpn_model": keras2_order})

    load_weights(model, path)

    loaded = by_layer(model)["rpn_model"]
    for name, value in keras2_order:
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_by_position_loads_in_file_order_and_requires_equal_counts(tmp_path):
    model = build_model(num_classes=3)
    rng = np.random.default_rng(2)
    # Same structure, other layer names (as Keras 2 auto-names would give): only order matches.
    renamed = {f"layer_{i}": [(f"layer_{i}/w{j}:0", rng.normal(size=shape).astype("float32"))
                              for j, shape in enumerate(layer.shapes)]
               for i, layer in enumerate(model_layout(model))}
    path = tmp_path / "positional.h5"
    write_keras2_h5(path, renamed)

    report = load_weights(model, path, by_name=False)

    assert report.loaded_weight_count == report.model_weight_count == 28
    for layer, (_, weights) in zip(model_layout(model), renamed.items()):
        for variable, (_, value) in zip(layer.variables, weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)

    del renamed["layer_9"]
    write_keras2_h5(path, renamed)
    with pytest.raises(WeightsMismatchError, match="has 9 layers with weights but the model has"
                       " 10; by_name=False"):
        load_weights(model, path, by_name=False)


# === Unreadable files: one line each ===


def test_not_hdf5_file(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"<html>404 Not Found</html>")  # a typical failed download
    with pytest.raises(WeightsFileError, match="is not an HDF5 file") as info:
        inspect_weights(path, build_model(3))
    assert "\n" not in str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "coco.h5"
    write_keras2_h5(path, matterport_layers())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="truncated or corrupt") as info:
        load_weights(build_model(3), path, exclude=CLASS_SPECIFIC_LAYERS)
    assert "\n" not in str(info.value)


def test_hdf5_without_keras_layout(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 2)))
    with pytest.raises(WeightsFileError, match="without the Keras weights layout") as info:
        inspect_weights(path, build_model(3))
    assert "\n" not in str(info.value)


def test_keras3_weights_file_and_missing_file(tmp_path):
    model = build_model(3)
    keras3_path = tmp_path / "model.weights.h5"
    model.save_weights(keras3_path)
    with pytest.raises(WeightsFileError, match="Keras 3 .weights.h5 file"):
        inspect_weights(keras3_path, model)
    with pytest.raises(WeightsFileError, match="does not exist"):
        inspect_weights(tmp_path / "absent.h5", model)


# === Writing ===


def randomize(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.uniform(0.5, 1.5, size=variable.shape).astype("float32"))


def test_save_then_load_round_trip(tmp_path):
    source, target = build_model(3), build_model(3)
    randomize(source, seed=3)
    path = tmp_path / "ckpt.h5"

    save_weights(source, path, extra_attrs={"epoch": 4})
    report = load_weights(target, path)

    assert report.ok and report.missing_in_file == [] and report.unused_in_file == []
    assert report.loaded_weight_count == 28
    assert report.keras_version == keras.__version__
    saved, loaded = snapshot(source), snapshot(target)
    for (_, a), (_, b) in zip(sorted(saved.items()), sorted(loaded.items())):
        np.testing.assert_array_equal(a, b)


def test_saved_file_has_the_keras2_layout(tmp_path):
    model = build_model(3)
    path = tmp_path / "ckpt.h5"
    save_weights(model, path, extra_attrs={"epoch": 4})

    # Read it the way Keras 2's loader does: bytes attributes, datasets at layer/weight_name.
    with h5py.File(path, "r") as f:
        assert [n.decode() for n in f.attrs["layer_names"]] == [la.name for la in model.layers]
        assert f.attrs["backend"] == b"tensorflow"
        assert f.attrs["keras_version"] == keras.__version__.encode()
        assert f.attrs["epoch"] == 4
        assert list(f["conv1_relu"].attrs["weight_names"]) == []
        assert list(f["rpn_model"].attrs["weight_names"]) == [
            n.encode() for n, _ in matterport_layers()["rpn_model"]]
        assert list(f["mrcnn_class_conv1"].attrs["weight_names"]) == [
            b"mrcnn_class_conv1/kernel:0", b"mrcnn_class_conv1/bias:0"]
        assert f["bn_conv1/bn_conv1/moving_variance:0"].shape == (4,)
        assert f["rpn_model/rpn_class_raw/kernel:0"].shape == (1, 1, 6, 2)


def test_interrupted_write_leaves_destination_untouched(tmp_path, monkeypatch):
    model = build_model(3)
    path = tmp_path / "ckpt.h5"
    real_write = h5layout._write_layer_group
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. preemption mid-checkpoint
        real_write(*args, **kwargs)

    monkeypatch.setattr(h5layout, "_write_layer_group", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, path)
    assert os.listdir(tmp_path) == []  # no destination and no temporary left behind

    monkeypatch.setattr(h5layout, "_write_layer_group", real_write)
    save_weights(model, path)
    good = path.read_bytes()
    monkeypatch.setattr(h5layout, "_write_layer_group", failing_write)
    calls.clear()
    randomize(model, seed=4)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, path)
    assert os.listdir(tmp_path) == ["ckpt.h5"] and path.read_bytes() == good


class TwoDense(L.Layer):
    """A custom layer whose two sub-layers both own a `kernel` and a `bias`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first, self.second = L.Dense(3), L.Dense(2)

    def call(self, x):
        return self.second(self.first(x))


def test_custom_layer_with_repeated_short_names_round_trips(tmp_path):
    def build() -> keras.Model:
        inputs = keras.Input((4,))
        return keras.Model(inputs, TwoDense(name="pair")(inputs))

    source, target = build(), build()
    (layer,) = model_layout(source)
    assert len(set(layer.weight_names)) == 4  # unique although every short name repeats
    randomize(source, seed=5)
    save_weights(source, tmp_path / "pair.h5")
    assert load_weights(target, tmp_path / "pair.h5").loaded_weight_count == 4
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
