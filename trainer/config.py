"""Config: matterport's configuration keys and meanings, loaded from YAML, strictly validated.

A matterport user's config ports by copying values: the keys are the same upper-case names
(`IMAGES_PER_GPU`, `RPN_ANCHOR_SCALES`, `TRAIN_ROIS_PER_IMAGE`, ...) with the same defaults.
Subclassing works as in matterport (`class ShapesConfig(Config): NUM_CLASSES = 4`), and so do
keyword overrides (`Config(NUM_CLASSES=4)`), YAML presets and `KEY=VALUE` strings.

A Config is immutable once built: derived values (BATCH_SIZE, IMAGE_SHAPE, ...) could not go
stale otherwise. `cfg.replace(KEY=value)` returns a new, validated one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trainer.errors import ConfigError

LOSS_NAMES = (
    "rpn_class_loss",
    "rpn_bbox_loss",
    "mrcnn_class_loss",
    "mrcnn_bbox_loss",
    "mrcnn_mask_loss",
)
BACKBONES = ("resnet18", "resnet50", "resnet101")
RESIZE_MODES = ("none", "square", "pad64", "crop")
OPTIMIZERS = ("sgd", "adam", "adamw")
NORMS = ("batch", "group")
MASK_HEAD_ROIS = ("dynamic", "static")
LR_DECAYS = ("none", "cosine")
MIXED_PRECISIONS = ("none", "float16", "bfloat16")
GROUP_NORM_GROUPS = 32  # NORM=group: channels per normalisation group = channels / 32

# Every key with its default (matterport's) and the kind of value it holds. Kinds: "int",
# "float", "bool", "str", "ints" / "floats" (a fixed- or any-length sequence), "loss_weights".
_SCHEMA: dict[str, tuple[Any, str]] = {
    "NAME": ("mrcnn", "str"),
    "GPU_COUNT": (1, "int"),
    "WORKERS": (1, "int"),  # not matterport's: machines (TF_CONFIG tasks) training together
    "IMAGES_PER_GPU": (2, "int"),
    "STEPS_PER_EPOCH": (1000, "int"),
    "VALIDATION_STEPS": (50, "int"),
    "BACKBONE": ("resnet101", "str"),
    "BACKBONE_STRIDES": ((4, 8, 16, 32, 64), "ints"),
    "FPN_CLASSIF_FC_LAYERS_SIZE": (1024, "int"),
    "TOP_DOWN_PYRAMID_SIZE": (256, "int"),
    "NUM_CLASSES": (2, "int"),
    "RPN_ANCHOR_SCALES": ((32, 64, 128, 256, 512), "ints"),
    "RPN_ANCHOR_RATIOS": ((0.5, 1.0, 2.0), "floats"),
    "RPN_ANCHOR_STRIDE": (1, "int"),
    "RPN_NMS_THRESHOLD": (0.7, "float"),
    "RPN_TRAIN_ANCHORS_PER_IMAGE": (256, "int"),
    "PRE_NMS_LIMIT": (6000, "int"),
    "POST_NMS_ROIS_TRAINING": (2000, "int"),
    "POST_NMS_ROIS_INFERENCE": (1000, "int"),
    "USE_MINI_MASK": (True, "bool"),
    "MINI_MASK_SHAPE": ((56, 56), "ints"),
    "IMAGE_RESIZE_MODE": ("square", "str"),
    "IMAGE_MIN_DIM": (800, "int"),
    "IMAGE_MAX_DIM": (1024, "int"),
    "IMAGE_MIN_SCALE": (0.0, "float"),
    "IMAGE_CHANNEL_COUNT": (3, "int"),
    "MEAN_PIXEL": ((123.7, 116.8, 103.9), "floats"),
    "TRAIN_ROIS_PER_IMAGE": (200, "int"),
    "ROI_POSITIVE_RATIO": (0.33, "float"),
    "POOL_SIZE": (7, "int"),
    "MASK_POOL_SIZE": (14, "int"),
    "MASK_SHAPE": ((28, 28), "ints"),
    "MAX_GT_INSTANCES": (100, "int"),
    "RPN_BBOX_STD_DEV": ((0.1, 0.1, 0.2, 0.2), "floats"),
    "BBOX_STD_DEV": ((0.1, 0.1, 0.2, 0.2), "floats"),
    "DETECTION_MAX_INSTANCES": (100, "int"),
    "DETECTION_MIN_CONFIDENCE": (0.7, "float"),
    "DETECTION_NMS_THRESHOLD": (0.3, "float"),
    "LEARNING_RATE": (0.001, "float"),
    "LEARNING_MOMENTUM": (0.9, "float"),
    "WEIGHT_DECAY": (0.0001, "float"),
    "LOSS_WEIGHTS": ({name: 1.0 for name in LOSS_NAMES}, "loss_weights"),
    "USE_RPN_ROIS": (True, "bool"),
    "TRAIN_BN": (False, "bool"),
    "GRADIENT_CLIP_NORM": (5.0, "float"),
    # Not matterport's: for training from random initialisation. The defaults keep matterport's
    # behaviour (SGD at a constant rate, BatchNorm, only RPN proposals as ROIs).
    "OPTIMIZER": ("sgd", "str"),
    "LR_WARMUP_STEPS": (0, "int"),
    "LR_DECAY": ("none", "str"),
    "NORM": ("batch", "str"),
    "PROPOSALS_INCLUDE_GT": (False, "bool"),
    # Not matterport's: how the step runs, not what it computes (weights stay float32).
    # MIXED_PRECISION: the backbone, FPN and heads compute in float16/bfloat16; boxes, anchors,
    # targets, NMS and losses stay float32. JIT_COMPILE: the train step compiled with XLA.
    "MIXED_PRECISION": ("none", "str"),
    "JIT_COMPILE": (False, "bool"),
    # Execution only (same weights, same results): "dynamic" runs the training graph's mask
    # head on the positive ROIs the targets layer found and the inference graph's on the
    # detections found (shapes known at run time: CPU, GPU); "static" on all MAX_POSITIVE_ROIS
    # / DETECTION_MAX_INSTANCES slots, padding included (fixed shapes: XLA, TPU; JIT_COMPILE
    # true takes the static path whatever this says). Empty detection slots' masks: 0.5.
    "MASK_HEAD_ROIS": ("dynamic", "str"),
}
DERIVED_KEYS = ("BATCH_SIZE", "IMAGE_SHAPE", "IMAGE_META_SIZE")
# The keys that decide the shapes of the model's weights: what fetch-weights checks a file
# against, and all it is given (its cache key then ignores the training settings).
MODEL_SHAPE_KEYS = ("NAME", "BACKBONE", "NORM", "NUM_CLASSES", "IMAGE_CHANNEL_COUNT",
                    "TOP_DOWN_PYRAMID_SIZE", "RPN_ANCHOR_RATIOS", "RPN_ANCHOR_STRIDE",
                    "POOL_SIZE", "MASK_POOL_SIZE", "FPN_CLASSIF_FC_LAYERS_SIZE", "TRAIN_BN")


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Returns `value` as the kind `key` holds, or raises ConfigError saying what was expected."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{key}: expected {expected}, got {value!r}")

    if isinstance(value, np.ndarray):
        value = value.tolist()
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise fail("true or false")
        return bool(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise fail("an integer")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise fail("a number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if kind in ("ints", "floats"):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        item_kind = kind[:-1]
        return tuple(_coerce(f"{key}[{i}]", v, item_kind) for i, v in enumerate(value))
    if kind == "loss_weights":
        if not isinstance(value, Mapping):
            raise fail(f"a mapping of {', '.join(LOSS_NAMES)} to weights")
        unknown = sorted(set(value) - set(LOSS_NAMES))
        if unknown:
            raise ConfigError(
                f"LOSS_WEIGHTS: unknown loss {unknown[0]!r}{_did_you_mean(unknown[0], LOSS_NAMES)}"
            )
        weights = {name: 1.0 for name in LOSS_NAMES}
        weights.update({k: _coerce(f"LOSS_WEIGHTS.{k}", v, "float") for k, v in value.items()})
        return weights
    raise AssertionError(f"unknown kind {kind}")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word.upper(), list(choices), n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


class Config:
    """Matterport's configuration. Class attributes of a subclass override the defaults, and
    keyword arguments override both. See `_SCHEMA` for every key and its default.
    """

    def __init__(self, **overrides: Any) -> None:
        values: dict[str, Any] = {}
        for key, (default, _) in _SCHEMA.items():
            values[key] = getattr(type(self), key, default)
        for key, value in overrides.items():
            if key not in _SCHEMA:
                if key in DERIVED_KEYS:
                    raise ConfigError(f"{key} is derived from other keys and cannot be set")
                raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, _SCHEMA)}")
            values[key] = value
        for key, value in values.items():
            values[key] = _coerce(key, value, _SCHEMA[key][1])
        _validate(values)
        object.__setattr__(self, "_values", values)

    # === Access ===

    def __getattr__(self, key: str) -> Any:
        # Only reached for names that are neither keys nor attributes.
        raise AttributeError(f"Config has no key {key!r}{_did_you_mean(key, _SCHEMA)}")

    def __getattribute__(self, key: str) -> Any:
        # Subclass attributes are defaults only: the validated value always wins.
        if key in _SCHEMA:
            value = object.__getattribute__(self, "_values")[key]
            return dict(value) if isinstance(value, dict) else value
        return object.__getattribute__(self, key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(
            f"Config is immutable (derived values would go stale): use cfg.replace({key}=...)"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config(NAME={self.NAME!r}, BACKBONE={self.BACKBONE!r}, ...)"

    # === Derived values ===

    @property
    def BATCH_SIZE(self) -> int:  # noqa: N802 - matterport's name
        return self.IMAGES_PER_GPU * self.GPU_COUNT

    @property
    def IMAGE_SHAPE(self) -> np.ndarray:  # noqa: N802
        side = self.IMAGE_MIN_DIM if self.IMAGE_RESIZE_MODE == "crop" else self.IMAGE_MAX_DIM
        return np.array([side, side, self.IMAGE_CHANNEL_COUNT])

    @property
    def IMAGE_META_SIZE(self) -> int:  # noqa: N802
        # image_id, original shape (3), resized shape (3), window (4), scale, active class ids
        return 1 + 3 + 3 + 4 + 1 + self.NUM_CLASSES

    @property
    def ANCHORS_PER_LOCATION(self) -> int:  # noqa: N802
        return len(self.RPN_ANCHOR_RATIOS)

    @property
    def MAX_POSITIVE_ROIS(self) -> int:  # noqa: N802
        """Slots for positive ROIs among TRAIN_ROIS_PER_IMAGE, as matterport computes them."""
        return int(self.TRAIN_ROIS_PER_IMAGE * self.ROI_POSITIVE_RATIO)

    # === Building ===

    def replace(self, **overrides: Any) -> Config:
        """A new Config with `overrides` applied on top of this one's values."""
        return type(self)(**{**self._values, **overrides})

    def with_overrides(self, assignments: Iterable[str]) -> Config:
        """Applies `KEY=VALUE` strings; VALUE is YAML (`0.01`, `[64, 128]`, `true`)."""
        return self.replace(**parse_assignments(assignments))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> Config:
        """Loads a YAML preset (a flat mapping of keys to values) with `yaml.safe_load`."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        return cls.from_text(text, overrides, source=str(path))

    @classmethod
    def from_text(cls, text: str, overrides: Iterable[str] = (), *,
                  source: str = "config text") -> Config:
        """A Config from YAML text (what `to_yaml` writes); `source` names it in errors."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} is not valid YAML: {err}".splitlines()[0]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        try:
            return cls(**data).with_overrides(overrides)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every key (derived ones included) as plain JSON/YAML-ready values."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._values.items()}
        out["LOSS_WEIGHTS"] = dict(self._values["LOSS_WEIGHTS"])
        out["BATCH_SIZE"] = self.BATCH_SIZE
        out["IMAGE_SHAPE"] = self.IMAGE_SHAPE.tolist()
        out["IMAGE_META_SIZE"] = self.IMAGE_META_SIZE
        return out

    def model_shape_yaml(self) -> str:
        """MODEL_SHAPE_KEYS as YAML: `Config.from_text` of it builds a model whose weights
        have this config's shapes (the other keys at their defaults)."""
        data = self.to_dict()
        return yaml.safe_dump({key: data[key] for key in MODEL_SHAPE_KEYS}, sort_keys=True)

    def to_yaml(self) -> str:
        """The settable keys as YAML; `Config.from_yaml` of it gives an equal Config."""
        data = {k: v for k, v in self.to_dict().items() if k not in DERIVED_KEYS}
        return yaml.safe_dump(data, sort_keys=True)

    def display(self) -> None:
        """Prints every key and value (matterport's `display`)."""
        print("\nConfigurations:")
        for key, value in sorted(self.to_dict().items()):
            print(f"{key:30} {value}")
        print()


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """`["IMAGES_PER_GPU=1", "RPN_ANCHOR_SCALES=[8, 16, 32, 64, 128]"]` -> a dict of values."""
    parsed: dict[str, Any] = {}
    for text in assignments:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. IMAGES_PER_GPU=1)")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {text!r}: VALUE is not valid YAML") from None
    return parsed


def _validate(v: dict[str, Any]) -> None:
    """Cross-key constraints; each failure names the key and the rule it broke."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for key in ("GPU_COUNT", "WORKERS", "IMAGES_PER_GPU", "STEPS_PER_EPOCH", "NUM_CLASSES",
                "TRAIN_ROIS_PER_IMAGE", "MAX_GT_INSTANCES", "DETECTION_MAX_INSTANCES",
                "PRE_NMS_LIMIT", "POST_NMS_ROIS_TRAINING", "POST_NMS_ROIS_INFERENCE",
                "RPN_TRAIN_ANCHORS_PER_IMAGE", "POOL_SIZE", "MASK_POOL_SIZE",
                "IMAGE_CHANNEL_COUNT", "RPN_ANCHOR_STRIDE", "TOP_DOWN_PYRAMID_SIZE",
                "FPN_CLASSIF_FC_LAYERS_SIZE"):
        check(v[key] >= 1, f"{key} must be at least 1, got {v[key]}")
    check(v["VALIDATION_STEPS"] >= 0,
          f"VALIDATION_STEPS must be >= 0 (0: no validation), got {v['VALIDATION_STEPS']}")
    check(v["NUM_CLASSES"] >= 2,
          f"NUM_CLASSES counts the background too: it must be at least 2, got {v['NUM_CLASSES']}")
    for key, choices in (("OPTIMIZER", OPTIMIZERS), ("NORM", NORMS), ("LR_DECAY", LR_DECAYS),
                         ("MIXED_PRECISION", MIXED_PRECISIONS),
                         ("MASK_HEAD_ROIS", MASK_HEAD_ROIS)):
        check(v[key] in choices, f"{key} must be one of {', '.join(choices)}, got {v[key]!r}")
    check(v["LR_WARMUP_STEPS"] >= 0,
          f"LR_WARMUP_STEPS must be >= 0 (0: no warm-up), got {v['LR_WARMUP_STEPS']}")
    check(v["NORM"] == "batch" or v["TOP_DOWN_PYRAMID_SIZE"] % GROUP_NORM_GROUPS == 0,
          f"NORM=group splits channels into {GROUP_NORM_GROUPS} groups: TOP_DOWN_PYRAMID_SIZE "
          f"must be a multiple of {GROUP_NORM_GROUPS}, got {v['TOP_DOWN_PYRAMID_SIZE']}")
    check(v["NORM"] == "batch" or v["FPN_CLASSIF_FC_LAYERS_SIZE"] % GROUP_NORM_GROUPS == 0,
          f"NORM=group splits channels into {GROUP_NORM_GROUPS} groups: "
          f"FPN_CLASSIF_FC_LAYERS_SIZE must be a multiple of {GROUP_NORM_GROUPS}, got "
          f"{v['FPN_CLASSIF_FC_LAYERS_SIZE']}")
    check(v["BACKBONE"] in BACKBONES,
          f"BACKBONE must be one of {', '.join(BACKBONES)}, got {v['BACKBONE']!r}")
    check(v["IMAGE_RESIZE_MODE"] in RESIZE_MODES,
          f"IMAGE_RESIZE_MODE must be one of {', '.join(RESIZE_MODES)}, "
          f"got {v['IMAGE_RESIZE_MODE']!r}")
    mode = v["IMAGE_RESIZE_MODE"]
    if mode == "square":
        check(v["IMAGE_MAX_DIM"] % 64 == 0,
              f"IMAGE_MAX_DIM must be a multiple of 64 (2**6, for the FPN's six levels of "
              f"halving) in 'square' mode, got {v['IMAGE_MAX_DIM']}; try "
              f"{max(64, 64 * round(v['IMAGE_MAX_DIM'] / 64))}")
        check(v["IMAGE_MIN_DIM"] <= v["IMAGE_MAX_DIM"],
              f"IMAGE_MIN_DIM ({v['IMAGE_MIN_DIM']}) must not exceed IMAGE_MAX_DIM "
              f"({v['IMAGE_MAX_DIM']})")
    if mode == "crop":
        check(v["IMAGE_MIN_DIM"] % 64 == 0,
              f"IMAGE_MIN_DIM must be a multiple of 64 (the FPN's six levels of halving) in "
              f"'crop' mode, got {v['IMAGE_MIN_DIM']}")
    check(v["IMAGE_MIN_DIM"] >= 1 and v["IMAGE_MAX_DIM"] >= 1, "image dimensions must be positive")
    levels = len(v["BACKBONE_STRIDES"])
    check(v["BACKBONE_STRIDES"] == (4, 8, 16, 32, 64),
          f"BACKBONE_STRIDES must be (4, 8, 16, 32, 64) for the ResNet FPN (P2..P6), got "
          f"{v['BACKBONE_STRIDES']}")
    check(len(v["RPN_ANCHOR_SCALES"]) == levels,
          f"RPN_ANCHOR_SCALES needs one scale per pyramid level ({levels}), got "
          f"{len(v['RPN_ANCHOR_SCALES'])}")
    check(all(s > 0 for s in v["RPN_ANCHOR_SCALES"]), "RPN_ANCHOR_SCALES must be positive")
    check(len(v["RPN_ANCHOR_RATIOS"]) >= 1 and all(r > 0 for r in v["RPN_ANCHOR_RATIOS"]),
          f"RPN_ANCHOR_RATIOS must be positive numbers, got {v['RPN_ANCHOR_RATIOS']}")
    for key in ("RPN_NMS_THRESHOLD", "DETECTION_NMS_THRESHOLD", "DETECTION_MIN_CONFIDENCE"):
        check(0.0 <= v[key] <= 1.0, f"{key} must be in [0, 1], got {v[key]}")
    check(0.0 < v["ROI_POSITIVE_RATIO"] <= 1.0,
          f"ROI_POSITIVE_RATIO must be in (0, 1], got {v['ROI_POSITIVE_RATIO']}")
    check(int(v["TRAIN_ROIS_PER_IMAGE"] * v["ROI_POSITIVE_RATIO"]) >= 1,
          "TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO must leave at least one positive ROI slot")
    check(v["POST_NMS_ROIS_TRAINING"] >= v["TRAIN_ROIS_PER_IMAGE"],
          f"POST_NMS_ROIS_TRAINING ({v['POST_NMS_ROIS_TRAINING']}) must be at least "
          f"TRAIN_ROIS_PER_IMAGE ({v['TRAIN_ROIS_PER_IMAGE']})")
    check(v["RPN_TRAIN_ANCHORS_PER_IMAGE"] >= 2,
          "RPN_TRAIN_ANCHORS_PER_IMAGE must be at least 2 (half of it is for positives)")
    check(v["MASK_SHAPE"] == (2 * v["MASK_POOL_SIZE"],) * 2,
          f"MASK_SHAPE must be twice MASK_POOL_SIZE (the mask head upsamples once by 2): "
          f"expected {[2 * v['MASK_POOL_SIZE']] * 2}, got {list(v['MASK_SHAPE'])}")
    check(len(v["MINI_MASK_SHAPE"]) == 2 and min(v["MINI_MASK_SHAPE"]) >= 1,
          f"MINI_MASK_SHAPE must be (height, width), got {v['MINI_MASK_SHAPE']}")
    check(len(v["MEAN_PIXEL"]) == v["IMAGE_CHANNEL_COUNT"],
          f"MEAN_PIXEL needs one value per channel ({v['IMAGE_CHANNEL_COUNT']}), got "
          f"{len(v['MEAN_PIXEL'])}")
    for key in ("RPN_BBOX_STD_DEV", "BBOX_STD_DEV"):
        check(len(v[key]) == 4 and all(s > 0 for s in v[key]),
              f"{key} must be four positive numbers (dy, dx, dh, dw), got {v[key]}")
    check(v["LEARNING_RATE"] > 0, f"LEARNING_RATE must be positive, got {v['LEARNING_RATE']}")
    check(0.0 <= v["LEARNING_MOMENTUM"] < 1.0,
          f"LEARNING_MOMENTUM must be in [0, 1), got {v['LEARNING_MOMENTUM']}")
    check(v["WEIGHT_DECAY"] >= 0, f"WEIGHT_DECAY must be >= 0, got {v['WEIGHT_DECAY']}")
    check(v["GRADIENT_CLIP_NORM"] > 0 and math.isfinite(v["GRADIENT_CLIP_NORM"]),
          f"GRADIENT_CLIP_NORM must be a positive number, got {v['GRADIENT_CLIP_NORM']}")
    check(all(w >= 0 for w in v["LOSS_WEIGHTS"].values()), "LOSS_WEIGHTS must be >= 0")
    check(v["USE_RPN_ROIS"],
          "USE_RPN_ROIS=false (heads trained on externally generated ROIs) is not supported: "
          "the heads always train on the RPN's proposals")
