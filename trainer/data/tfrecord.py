"""`tf.train.Example` encoding and decoding with TF Model Garden's keys (DESIGN.md, "Dataset on
disk"), plus `image/source`, the source name that `no_augmentation_sources` refers to.

Encoding runs in the prepare process (plain Python); decoding is pure TensorFlow so that it runs
inside `tf.data` (`dataset.map(decode_example)`).

Boxes are stored normalised to [0, 1] as separate ymin/xmin/ymax/xmax lists; pixel boxes in
this package are `(y1, x1, y2, x2)` with y2/x2 exclusive, so `ymax = y2 / height`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

IMAGE_FORMATS = ("png", "jpeg")

# === Decoder ===
# Every key of a record, with its type and meaning. Per-object lists are VarLen: all of them
# have one entry per object (N, possibly 0).
FEATURES = {
    # The image file's bytes exactly as read from the source (PNG or JPEG).
    "image/encoded": tf.io.FixedLenFeature((), tf.string),
    # "png" or "jpeg": the format of image/encoded ("" in records that lack it).
    "image/format": tf.io.FixedLenFeature((), tf.string, default_value=""),
    # Image size in pixels; masks have this size too.
    "image/height": tf.io.FixedLenFeature((), tf.int64),
    "image/width": tf.io.FixedLenFeature((), tf.int64),
    # The file name inside the source's images folder ("000042.png" for generated shapes).
    "image/filename": tf.io.FixedLenFeature((), tf.string, default_value=""),
    # The source's image id as text (COCO's integer `id`; the sample index for shapes). The
    # val COCO json uses int(source_id) as its image id.
    "image/source_id": tf.io.FixedLenFeature((), tf.string),
    # The source name: "shapes" or "coco" (ours; "" in records written by Model Garden's
    # converters, which have only the keys above and below).
    "image/source": tf.io.FixedLenFeature((), tf.string, default_value=""),
    # Object boxes, normalised by height/width: ymin = y1 / H, ymax = y2 / H (y2 exclusive).
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    # Contiguous class id 1..N (0 is the background); names in dataset.json's class_names.
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    # The class name of each object (class_names[label]).
    "image/object/class/text": tf.io.VarLenFeature(tf.string),
    # 1 for a COCO crowd region (iscrowd), else 0 (absent: no crowd regions).
    "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
    # Mask area in pixels (absent: 0).
    "image/object/area": tf.io.VarLenFeature(tf.float32),
    # One single-channel PNG per object, image-sized, non-zero inside the object: ours and
    # Model Garden's converters write 8-bit 0/1.
    "image/object/mask": tf.io.VarLenFeature(tf.string),
}


def decode_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialized example into tensors (pure TF ops; usable in `tf.data`).

    Returns:
      image: uint8 [H, W, 3]
      masks: bool [H, W, N]
      boxes: float32 [N, (y1, x1, y2, x2)] normalised to [0, 1]
      class_ids: int32 [N] in 1..num_classes-1
      is_crowd: bool [N]
      area: float32 [N]
      source, source_id, filename: string []
      height, width: int32 []
    """
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    dense = {
        key: tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
        for key, value in parsed.items()
    }
    height = tf.cast(dense["image/height"], tf.int32)
    width = tf.cast(dense["image/width"], tf.int32)
    image = tf.io.decode_image(dense["image/encoded"], channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    boxes = tf.stack(
        [dense[f"image/object/bbox/{side}"] for side in ("ymin", "xmin", "ymax", "xmax")], axis=-1
    )
    labels = dense["image/object/class/label"]
    return {
        "image": image,
        "masks": _decode_masks(dense["image/object/mask"], height, width),
        "boxes": tf.reshape(boxes, [-1, 4]),
        "class_ids": tf.cast(dense["image/object/class/label"], tf.int32),
        "is_crowd": _per_object(dense["image/object/is_crowd"], labels) > 0,
        "area": _per_object(dense["image/object/area"], labels),
        "source": dense["image/source"],
        "source_id": dense["image/source_id"],
        "filename": dense["image/filename"],
        "height": height,
        "width": width,
    }


def _per_object(values: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """An optional per-object list: as stored, or zeros (one per label) when the record has
    none (Model Garden writes is_crowd and area only for COCO)."""
    return tf.cond(tf.size(values) > 0, lambda: values,
                   lambda: tf.zeros(tf.shape(labels), values.dtype))


def _decode_masks(pngs: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """string [N] of mask PNGs -> bool [H, W, N]."""

    def decode_all() -> tf.Tensor:
        masks = tf.map_fn(
            lambda png: tf.io.decode_png(png, channels=1)[:, :, 0] > 0,
            pngs,
            fn_output_signature=tf.TensorSpec([None, None], tf.bool),
        )
        return tf.transpose(masks, [1, 2, 0])

    # map_fn cannot stack zero elements of unknown shape: an image without objects gets an
    # explicit empty [H, W, 0].
    masks = tf.cond(
        tf.size(pngs) > 0, decode_all, lambda: tf.zeros([height, width, 0], tf.bool)
    )
    return tf.ensure_shape(masks, [None, None, None])


# === Encoder ===


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def encode_example(
    *,
    image_encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    filename: str,
    source_id: str,
    source: str,
    boxes: np.ndarray,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    is_crowd: Sequence[bool],
    area: Sequence[float],
    masks_png: Sequence[bytes],
) -> bytes:
    """One image and its N objects -> a serialized `tf.train.Example`.

    boxes: float [N, (y1, x1, y2, x2)] in pixels, y2/x2 exclusive (normalised here).
    class_ids: 1..num_classes-1; class_names: the name of each object (same length N).
    masks_png: N single-channel PNGs of size height x width, non-zero inside the object.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    count = len(boxes)
    lengths = {len(class_ids), len(class_names), len(is_crowd), len(area), len(masks_png)}
    if lengths != {count}:
        raise ValueError(f"every per-object list needs {count} entries, got lengths {lengths}")
    scale = np.array([height, width, height, width], dtype=np.float64)
    normalised = boxes / scale
    feature = {
        "image/encoded": _bytes([image_encoded]),
        "image/format": _bytes([image_format.encode()]),
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/filename": _bytes([filename.encode()]),
        "image/source_id": _bytes([source_id.encode()]),
        "image/source": _bytes([source.encode()]),
        "image/object/bbox/ymin": _floats(normalised[:, 0]),
        "image/object/bbox/xmin": _floats(normalised[:, 1]),
        "image/object/bbox/ymax": _floats(normalised[:, 2]),
        "image/object/bbox/xmax": _floats(normalised[:, 3]),
        "image/object/class/label": _ints(class_ids),
        "image/object/class/text": _bytes([name.encode() for name in class_names]),
        "image/object/is_crowd": _ints([bool(c) for c in is_crowd]),
        "image/object/area": _floats(area),
        "image/object/mask": _bytes(masks_png),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def read_examples(paths: Sequence[str]) -> tf.data.Dataset:
    """The decoded examples of TFRecord files, in file order (for tests and inspection)."""
    return tf.data.TFRecordDataset(list(paths)).map(decode_example)
