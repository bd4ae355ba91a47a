"""Declarative data augmentation: a YAML/JSON-serialisable spec run with TensorFlow ops.

`Augmentation.from_spec(spec)` is fn(image, masks) -> (image, masks) for tf.data. Geometric
augmenters move the masks with the image (nearest: they stay binary); photometric ones touch
the image only. Grammar (imgaug's names; a list means `sequential`; a range may be x = [x, x]):

    sequential: [A, ...]                    every child, in order
    sometimes: p, then: [...], else: [...]  `then` with probability p, otherwise `else`
    one_of: [A, ...]                        one child, chosen uniformly
    some_of: {n: [lo, hi], of: [A, ...]}    n ~ U{lo..hi} distinct children, in list order
    fliplr | flipud | rot90: p              with probability p: mirror left-right | up-down,
                                            turn by 90/180/270 degrees (square images only)
    crop_and_pad: {percent: [lo, hi]}       each side padded (> 0) or cropped (< 0) by its
                                            own fraction of the size, then resized back
    affine: {scale: [lo, hi], translate_percent: [lo, hi], rotate: [lo, hi]}
                                            about the centre; shift per axis as a fraction of
                                            the size; degrees clockwise; fill 0
    gaussian_blur: [sigma_lo, sigma_hi]     sigma in pixels
    multiply | add | contrast: [lo, hi]     x * f | x + f | 128 + f * (x - 128), pixel values
    gaussian_noise: [lo, hi]                per-pixel noise, std in pixel values
    grayscale: [alpha_lo, alpha_hi]         blend towards luminance (RGB images)
Random draws use tf.random (stateful): `tf.random.set_seed` makes a run reproducible.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

import tensorflow as tf
import yaml

from trainer.errors import UserError

Augmenter = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def _error(where: str, message: str) -> UserError:
    return UserError(f"augmentation spec: {where or 'top level'}: {message}")


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"valid names: {', '.join(valid)}"


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(where, f"expected a number, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise _error(where, f"{value:g} is outside the allowed [{low:g}, {high:g}]")
    return float(value)


def _probability(value: Any, where: str) -> float:
    return _number(value, f"{where} probability", 0.0, 1.0)


def _range(value: Any, where: str, low: float, high: float) -> list[float]:
    """[lo, hi] (or one number) with low <= lo <= hi <= high."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _error(where, f"expected [lo, hi], got {len(value)} values {list(value)}")
        lo, hi = (_number(v, where, low, high) for v in value)
    else:
        lo = hi = _number(value, where, low, high)
    if lo > hi:
        raise _error(where, f"lo {lo:g} > hi {hi:g}: write the range as [lo, hi]")
    return [lo, hi]


def _ranges(value: Any, where: str, allowed: dict[str, tuple[float, float, float]]) -> dict:
    """A mapping of named ranges: allowed[name] = (default, low, high)."""
    if not isinstance(value, dict):
        raise _error(where, f"expected a mapping with keys {list(allowed)}, got {value!r}")
    for key in value:
        if key not in allowed:
            raise _error(where, f"unknown parameter {key!r}, {_suggest(str(key), allowed)}")
    return {key: _range(value.get(key, default), f"{where}.{key}", low, high)
            for key, (default, low, high) in allowed.items()}


def _draw(bounds: list[float], shape=()) -> tf.Tensor:
    return tf.random.uniform(shape, *bounds)


def _when(condition: float | Callable[[], tf.Tensor], augment: Augmenter,
          otherwise: Augmenter = lambda image, masks: (image, masks)) -> Augmenter:
    """`augment` where condition() holds (a number p: with probability p), else `otherwise`."""
    test = condition if callable(condition) else lambda: tf.random.uniform([]) < condition
    return lambda image, masks: tf.cond(test(), lambda: augment(image, masks),
                                        lambda: otherwise(image, masks))


def _rot90(image: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Square pairs turned counter-clockwise by 90, 180 or 270 degrees; others unchanged."""
    square = tf.equal(tf.shape(image)[0], tf.shape(image)[1])
    turns = tf.where(square, tf.random.uniform([], 1, 4, tf.int32), 0)
    # One rotation for both: masks ride along as extra channels (rot90 needs channels > 0).
    both = tf.image.rot90(tf.concat([image, tf.cast(masks, image.dtype)], axis=-1), turns)
    turned_image, turned_masks = tf.split(both, [tf.shape(image)[-1], -1], axis=-1)
    return turned_image, turned_masks > 0


def _crop_and_pad(params: dict, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    fractions = _draw(params["percent"], [4])  # top, bottom, left, right
    top, bottom, left, right = tf.unstack(tf.round(fractions * [height, height, width, width]))
    # The padded/cropped canvas is resized back to (height, width), sampled at pixel centres.
    sy, sx = (height + top + bottom) / height, (width + left + right) / width
    return tf.stack([sx, 0.0, 0.5 * sx - 0.5 - left, 0.0, sy, 0.5 * sy - 0.5 - top, 0.0, 0.0])


def _affine(params: dict, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    scale, angle = _draw(params["scale"]), _draw(params["rotate"]) * (math.pi / 180.0)
    shift_x, shift_y = tf.unstack(_draw(params["translate_percent"], [2])
                                  * tf.stack([width, height]))
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    # Output -> input: the inverse of (rotate and scale about the centre, then shift).
    cos, sin, dx, dy = tf.cos(angle) / scale, tf.sin(angle) / scale, cx + shift_x, cy + shift_y
    return tf.stack([cos, sin, cx - cos * dx - sin * dy,
                     -sin, cos, cy + sin * dx - cos * dy, 0.0, 0.0])


def _warp(image: tf.Tensor, masks: tf.Tensor, transform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Output pixel (x, y) takes input (a0 x + a1 y + a2, b0 x + b1 y + b2), transform =
    [a0, a1, a2, b0, b1, b2, 0, 0]: bilinear for the image, nearest for the masks, 0 outside."""
    def run(x: tf.Tensor, interpolation: str) -> tf.Tensor:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2],
            fill_value=0.0, interpolation=interpolation, fill_mode="CONSTANT")[0]
    return (tf.saturate_cast(tf.round(run(tf.cast(image, tf.float32), "BILINEAR")), tf.uint8),
            run(tf.cast(masks, tf.uint8), "NEAREST") > 0)


def _gaussian_blur(image: tf.Tensor, sigmas: list[float]) -> tf.Tensor:
    radius = max(1, math.ceil(3.0 * sigmas[1]))  # a static kernel size, from the largest sigma
    sigma = tf.maximum(_draw(sigmas), 1e-3)  # ~0 gives a one-tap kernel: no change
    taps = tf.exp(-0.5 * tf.square(tf.range(-radius, radius + 1, dtype=tf.float32) / sigma))
    taps /= tf.reduce_sum(taps)

    def conv(x: tf.Tensor) -> tf.Tensor:  # separable, [C, H, W, 1], zero padding
        x = tf.nn.conv2d(x, tf.reshape(taps, [-1, 1, 1, 1]), 1, "SAME")
        return tf.nn.conv2d(x, tf.reshape(taps, [1, -1, 1, 1]), 1, "SAME")
    planes = tf.transpose(image, [2, 0, 1])[..., None]
    # Dividing by the blurred ones keeps the zero padding from darkening the borders.
    return tf.transpose((conv(planes) / conv(tf.ones_like(planes[:1])))[..., 0], [1, 2, 0])


# name -> fn(image, masks), applied with the spec's probability.
FLIPS: dict[str, Augmenter] = {
    "fliplr": lambda image, masks: (tf.reverse(image, [1]), tf.reverse(masks, [1])),
    "flipud": lambda image, masks: (tf.reverse(image, [0]), tf.reverse(masks, [0])),
    "rot90": _rot90,
}
# name -> ({parameter: (default, low, high)}, fn(params, height, width) -> transform [8]).
WARPS = {
    "crop_and_pad": ({"percent": (0.0, -0.4, 1.0)}, _crop_and_pad),
    "affine": ({"scale": (1.0, 0.1, 10.0), "translate_percent": (0.0, -1.0, 1.0),
                "rotate": (0.0, -360.0, 360.0)}, _affine),
}
# name -> (low, high, fn(float32 image, [lo, hi]) -> float32 image); the masks stay as they are.
PHOTOMETRIC = {
    "gaussian_blur": (0.0, 10.0, _gaussian_blur),
    "multiply": (0.0, 10.0, lambda x, r: x * _draw(r)),
    "add": (-255.0, 255.0, lambda x, r: x + _draw(r)),
    "contrast": (0.0, 10.0, lambda x, r: 128.0 + _draw(r) * (x - 128.0)),
    "gaussian_noise": (0.0, 255.0, lambda x, r: x + _draw(r) * tf.random.normal(tf.shape(x))),
    "grayscale": (0.0, 1.0, lambda x, r: x + _draw(r) * (tf.image.rgb_to_grayscale(x) - x)),
}
NAMES = ("sequential", "sometimes", "one_of", "some_of", *FLIPS, *WARPS, *PHOTOMETRIC)


def _sequence(augmenters: list[Augmenter]) -> Augmenter:
    return lambda image, masks: reduce(lambda pair, augment: augment(*pair), augmenters,
                                       (image, masks))


def _some_of(options: list[Augmenter], lo: int, hi: int) -> Augmenter:
    """n ~ U{lo..hi} distinct options, applied in list order."""
    def apply(image: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        count = tf.random.uniform([], lo, hi + 1, tf.int32)
        rank = tf.random.shuffle(tf.range(len(options)))  # option i is picked if rank < n
        for i, augment in enumerate(options):
            image, masks = _when(lambda i=i: rank[i] < count, augment)(image, masks)
        return image, masks
    return apply


def _children(value: Any, where: str) -> tuple[list[dict], list[Augmenter]]:
    items = value if isinstance(value, (list, tuple)) else [value]
    parsed = [_parse(item, f"{where}[{i}]") for i, item in enumerate(items)]
    return [node for node, _ in parsed], [augment for _, augment in parsed]


def _parse(spec: Any, where: str) -> tuple[dict, Augmenter]:
    """One augmenter node -> (its normalised spec, its fn). Raises UserError."""
    if isinstance(spec, (list, tuple)):
        spec = {"sequential": spec}
    if not isinstance(spec, dict) or not spec:
        raise _error(where, f"expected an augmenter such as {{fliplr: 0.5}} or a list of them, "
                            f"got {spec!r}")
    if "sometimes" in spec:
        if set(spec) - {"sometimes", "then", "else"} or "then" not in spec:
            raise _error(where, "sometimes takes the keys sometimes, then and (optionally) "
                                f"else; got {sorted(map(str, spec))}")
        p = _probability(spec["sometimes"], f"{where}.sometimes")
        then_nodes, then = _children(spec["then"], f"{where}.then")
        else_nodes, otherwise = _children(spec.get("else") or [], f"{where}.else")
        node = {"sometimes": p, "then": then_nodes, **({"else": else_nodes} if else_nodes else {})}
        return node, _when(p, _sequence(then), _sequence(otherwise))
    if len(spec) != 1:
        raise _error(where, f"one augmenter per mapping, got {sorted(map(str, spec))}: put "
                            "several in a list")
    (name, value), = spec.items()
    inner = f"{where}.{name}" if where else str(name)
    if name == "sequential":
        nodes, augmenters = _children(value, inner)
        return {name: nodes}, _sequence(augmenters)
    if name == "one_of":
        nodes, options = _children(value, inner)
        if not nodes:
            raise _error(inner, "one_of needs at least one augmenter")
        return {name: nodes}, _some_of(options, 1, 1)
    if name == "some_of":
        if not isinstance(value, dict) or set(value) != {"n", "of"}:
            raise _error(inner, f"expected {{n: [lo, hi], of: [...]}}, got {value!r}")
        nodes, options = _children(value["of"], f"{inner}.of")
        lo, hi = _range(value["n"], f"{inner}.n", 0, len(nodes))
        if lo != int(lo) or hi != int(hi):
            raise _error(f"{inner}.n", f"expected whole numbers, got [{lo:g}, {hi:g}]")
        return {name: {"n": [int(lo), int(hi)], "of": nodes}}, _some_of(options, int(lo), int(hi))
    if name in FLIPS:
        p = _probability(value, inner)
        return {name: p}, _when(p, FLIPS[name])
    if name in WARPS:
        allowed, transform = WARPS[name]
        params = _ranges(value, inner, allowed)
        return {name: params}, lambda image, masks: _warp(
            image, masks, transform(params, *tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))))
    if name in PHOTOMETRIC:
        low, high, change = PHOTOMETRIC[name]
        bounds = _range(value, inner, low, high)
        return {name: bounds}, lambda image, masks: (
            tf.saturate_cast(tf.round(change(tf.cast(image, tf.float32), bounds)), tf.uint8), masks)
    raise _error(where, f"unknown augmenter {name!r}, {_suggest(str(name), NAMES)}")


def _load(spec: str | Path) -> Any:
    """A spec from a .yaml/.yml/.json path, or from YAML/JSON text."""
    text, source = str(spec), "the spec string"
    if isinstance(spec, Path) or ("\n" not in text and text.endswith((".yaml", ".yml", ".json"))):
        try:
            text, source = Path(spec).read_text(), str(spec)
        except OSError as err:
            raise UserError(f"augmentation spec file {spec}: {err.strerror}") from None
    try:
        return json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"augmentation spec in {source} is not valid YAML/JSON: "
                        f"{str(err).splitlines()[0]}") from None


class Augmentation:
    """A validated augmentation spec (a dict or list; None: no augmentation; else UserError),
    callable as fn(image uint8 [H, W, C], masks bool [H, W, N]) -> the same shapes and dtypes.
    """

    def __init__(self, spec: Any = None) -> None:
        self._node, self._augment = (_parse(spec, "") if spec is not None
                                     else (None, lambda image, masks: (image, masks)))

    @classmethod
    def from_spec(cls, spec: Any) -> Augmentation:
        """From None (no augmentation), a dict, a list (= sequential), YAML/JSON text, a path
        to a .yaml/.yml/.json file, or an Augmentation (returned as is)."""
        if isinstance(spec, Augmentation):
            return spec
        return cls(_load(spec) if isinstance(spec, (str, Path)) else spec)

    def to_spec(self) -> dict | None:
        """The normalised spec (plain dicts, lists, floats): `from_spec` of it is equal."""
        return json.loads(json.dumps(self._node))

    def describe(self) -> str:
        """One line for logs: the normalised spec in YAML flow style."""
        return "no augmentation" if self._node is None else yaml.safe_dump(
            self._node, default_flow_style=True, sort_keys=False, width=math.inf).strip()

    def __call__(self, image: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, masks = tf.convert_to_tensor(image), tf.convert_to_tensor(masks)
        augmented, moved = self._augment(image, masks)
        # tf.cond branches may loosen static shapes; the contract is "shapes unchanged".
        return tf.ensure_shape(augmented, image.shape), tf.ensure_shape(moved, masks.shape)
