"""`mrcnn data prepare`: a source (synthetic shapes or a COCO dataset) -> TFRecord shards.

Output folder (DESIGN.md, "Dataset on disk"):
  {split}-{i:05d}-of-{n:05d}.tfrecord   train and val shards, records dealt round-robin
  dataset.json                          class names, counts, skipped/repaired records with
                                        their reasons, the source's fingerprint, shard lists
  val_annotations.json                  the val split in COCO format (original coordinates,
                                        our contiguous category ids, masks as RLE)

The run streams: a lazy iterator of small tasks feeds a bounded pool of worker processes that
read, check and encode one image each; results come back in task order, so the output is
deterministic for any `workers`. Everything is written to a hidden folder beside `out_dir`
and renamed into place only when complete; a killed run's hidden folder is removed by the
next run (`remove_stale_partials`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import math
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data import coco, shapes
from trainer.data.coco_json import CocoJsonWriter, coco_annotations
from trainer.data.records import AnnotatedImage
from trainer.data.workers import available_cpus, ordered_results
from trainer.errors import UserError
from trainer.io.atomic import replace_dir, restore_replaced
from trainer.progress import Progress

SOURCES = ("shapes", "coco")
SPLITS = ("train", "val")
FORMAT_VERSION = 1
# Written last into every prepared folder: only a folder holding it (and nothing that prepare
# did not write) is ever replaced by a later prepare.
MARKER = ".mrcnn-prepared"
# Inside a partial folder while its run is alive: flocked by the writer (see
# remove_stale_partials); a partial folder without it is stale after this long unchanged.
PARTIAL_LOCK = ".lock"
STALE_PARTIAL_SECONDS = 3600
SHARD_NAME = re.compile(r"(train|val)-\d{5}-of-\d{5}\.tfrecord")
# zlib level for the PNGs we encode (generated images, masks): measured on 384 px shapes,
# level 3 encodes 40% faster than PIL's default 6 for files still a few KB. Lossless either way.
PNG_COMPRESS_LEVEL = 3


def split_of(source_id: str, seed: int, val_fraction: float) -> str:
    """"val" or "train" from a hash of the image id: stable when other images come or go."""
    digest = hashlib.sha256(f"{seed}/{source_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]


# === Worker side: one task -> one encoded record (no TensorFlow here) ===


@dataclass(frozen=True)
class _ShapesContext:
    seed: int
    image_size: int
    contiguous_ids: dict[int, int]  # shapes class id -> our id (all three unless a subset)


@dataclass(frozen=True)
class _Job:
    """What every worker call shares: how to read a task, and how to split."""

    source: str
    context: coco.CocoContext | _ShapesContext
    class_names: tuple[str, ...]
    seed: int
    val_fraction: float


def _read_shapes(context: _ShapesContext, index: int):
    sample = shapes.generate_sample(
        context.seed * 1_000_003 + index, context.image_size, context.image_size
    )
    name = f"shapes-{index:06d}.png"
    keep = [i for i, c in enumerate(sample.class_ids) if int(c) in context.contiguous_ids]
    if not keep:
        return None, [coco.Issue(name, coco.NO_OBJECTS, "no object in the selected categories")]
    buffer = io.BytesIO()
    Image.fromarray(sample.image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = buffer.getvalue()
    return AnnotatedImage(
        image_encoded=data,
        image_format="png",
        height=context.image_size,
        width=context.image_size,
        filename=name,
        image_id=index,
        masks=sample.masks[:, :, keep],
        boxes=sample.boxes[keep].astype(np.float64),
        class_ids=np.asarray([context.contiguous_ids[int(c)] for c in sample.class_ids[keep]],
                             dtype=np.int32),
        is_crowd=np.zeros(len(keep), dtype=bool),
        sha256=hashlib.sha256(data).hexdigest(),
    ), []


def encode_mask_png(mask: np.ndarray) -> bytes:
    """bool [H, W] -> an 8-bit grayscale PNG of 0/1, as TF Model Garden's converters write
    masks (its parser feeds the decoded values straight into mask targets; a 1-bit PNG would
    decode to 0/255 there)."""
    buffer = io.BytesIO()
    mask_image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
    mask_image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _encode_task(job: _Job, task) -> dict:
    """Reads one task; returns the record's fields (or None), its issues, its split, and for
    val records the COCO image and annotations (ids assigned by the parent)."""
    if job.source == "shapes":
        image, issues = _read_shapes(job.context, task)
        record_name = f"shapes-{task:06d}.png"
    else:
        record_name = coco.record_name(task.image)
        try:
            image, issues = coco.read_task(job.context, task)
        except Exception as err:  # a record nothing above foresaw must not stop the run
            image = None
            detail = f"{type(err).__name__}: {err}"
            issues = [coco.Issue(record_name, coco.UNREADABLE_RECORD, detail)]
    result = {"name": record_name, "issues": issues, "fields": None}
    if image is None:
        return result
    areas = image.masks.reshape(-1, image.masks.shape[-1]).sum(axis=0).astype(float)
    split = split_of(image.source_id, job.seed, job.val_fraction)
    result.update(
        split=split,
        sha256=image.sha256,
        fields=dict(
            image_encoded=image.image_encoded,
            image_format=image.image_format,
            height=image.height,
            width=image.width,
            filename=image.filename,
            source_id=image.source_id,
            source=job.source,
            boxes=image.boxes,
            class_ids=image.class_ids.tolist(),
            class_names=[job.class_names[c] for c in image.class_ids],
            is_crowd=image.is_crowd.tolist(),
            area=areas.tolist(),
            masks_png=[encode_mask_png(image.masks[:, :, i]) for i in range(len(areas))],
        ),
    )
    if split == "val":
        result["coco_image"] = {
            "id": image.image_id, "file_name": image.filename,
            "height": image.height, "width": image.width,
        }
        result["coco_annotations"] = coco_annotations(image)
    return result


def _crashed(job: _Job, task) -> dict:
    """The result of a task whose worker process died decoding it: skipped, with the reason."""
    name = coco.record_name(task.image) if job.source == "coco" else f"shapes-{task:06d}.png"
    detail = ("the process decoding it died (a native crash in an image or mask decoder, or "
              "out of memory); the run continued without it")
    return {"name": name, "issues": [coco.Issue(name, coco.DECODER_CRASHED, detail)],
            "fields": None}


# === Parent side: write shards, COCO json and dataset.json ===


def _plan(source: str, options: dict) -> tuple[_Job, Iterator, int | None, dict, list, list]:
    """(job, tasks, total, source description, categories, issues found while listing)."""
    seed, val_fraction, wanted = options["seed"], options["val_fraction"], options["categories"]
    listing_issues: list[coco.Issue] = []
    if source == "shapes":
        names = shapes.CLASS_NAMES[1:]
        unknown = [n for n in wanted or () if n not in names]
        if unknown:
            raise UserError(f"unknown categories {unknown} in --categories: shapes has {names}")
        chosen = [i for i, n in enumerate(names, 1) if not wanted or n in wanted]
        categories = [{"id": k, "name": names[i - 1], "source_category_id": i}
                      for k, i in enumerate(chosen, 1)]
        count = options["count"] if options["count"] is not None else 500
        size = options["image_size"] or 128
        if count < 1 or size < 16:
            raise UserError(f"--count must be >= 1 and --image-size >= 16, got {count}, {size}")
        context = _ShapesContext(seed, size, {c["source_category_id"]: c["id"] for c in categories})
        description = {"name": "shapes", "seed": seed, "count": count, "image_size": size}
        tasks, total = iter(range(count)), count
    else:
        if not options["annotations"] or not options["images"]:
            raise UserError("--source coco needs --annotations (instances JSON) and --images "
                            "(the images folder), local paths or gs:// URIs")
        reader = coco.CocoSource(options["annotations"], options["images"], wanted)
        categories = [{"id": c["id"], "name": c["name"], "source_category_id": c["coco_id"]}
                      for c in reader.categories]
        context = reader.context
        description = {"name": "coco", "annotations": options["annotations"],
                       "images": options["images"], "annotations_sha256": reader.annotations_sha256}
        limit = options["count"]
        tasks = reader.tasks(listing_issues, limit)
        total = len(reader) if limit is None else min(limit, len(reader))
    class_names = ("BG", *(c["name"] for c in categories))
    job = _Job(source, context, class_names, seed, val_fraction)
    return job, tasks, total, description, categories, listing_issues


def prepare_dataset(
    source: str,
    out_dir: str | Path,
    *,
    annotations: str | None = None,
    images: str | None = None,
    count: int | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    shards: int = 4,
    workers: int | None = None,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Prepares `source` ("shapes" or "coco") into `out_dir`; returns dataset.json's content
    plus the run's `out_dir`, `elapsed_seconds` and `images_per_second`.

    shapes: `count` images (default 500) of `image_size` (default 128) from `seed`.
    coco: `annotations` (instances JSON) and `images` (folder), local or gs://; `count`
    limits the number of images read. `categories` selects category names (ids 1..N follow
    the source's order). `shards` is the train shard count; val gets ceil(shards *
    val_fraction). Raises UserError on bad options or when no image is usable.
    """
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}: use one of {SOURCES}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shards < 1:
        raise UserError(f"--shards must be >= 1, got {shards}")
    workers = available_cpus() if workers is None else workers
    out = Path(out_dir).expanduser().absolute()
    if str(out_dir).startswith("gs://"):
        raise UserError("--out must be a local folder: prepare locally, then upload it")
    if restore_replaced(out):
        print(f"{out}: restored the dataset a killed run had moved aside", file=sys.stderr)
    _check_replaceable(out)
    options = dict(annotations=annotations, images=images, count=count, image_size=image_size,
                   val_fraction=val_fraction, seed=seed,
                   categories=list(categories) if categories else None)
    job, tasks, total, description, category_list, issues = _plan(source, options)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    started = time.monotonic()
    try:
        with _terminate_as_interrupt(), _held_lock(tmp / PARTIAL_LOCK):
            summary = _write_dataset(tmp, job, tasks, total, description, category_list,
                                     issues, {**options, "shards": shards, "workers": workers,
                                              "progress": progress})
            (tmp / PARTIAL_LOCK).unlink()  # still held: gone before the folder is published
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.monotonic() - started
    done = summary["images_read"]
    return {**summary, "out_dir": str(out), "elapsed_seconds": round(elapsed, 3),
            "images_per_second": round(done / max(elapsed, 1e-9), 2)}


@contextlib.contextmanager
def _held_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created) for the block: the kernel releases it when this
    process dies in any way, which is how a later run tells a dead run's partial folder from
    a live one's."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def remove_stale_partials(out: Path) -> list[Path]:
    """Deletes the hidden `.{out}.partial-*` folders that killed runs (SIGKILL, a lost node)
    left beside `out`; returns them. A folder is stale when its lock file can be locked (its
    writer is dead), or, without a lock file (written before locks, or being published),
    when nothing in it changed for STALE_PARTIAL_SECONDS. A live run's folder is never
    touched."""
    removed = []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-[0-9a-f]{{8}}")
    for folder in out.parent.iterdir() if out.parent.is_dir() else ():
        if pattern.fullmatch(folder.name) and folder.is_dir() and _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _abandoned(folder: Path) -> bool:
    try:
        with open(folder / PARTIAL_LOCK, "r+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer is alive
            return True
    except FileNotFoundError:
        newest = max((p.stat().st_mtime for p in folder.iterdir()),
                     default=folder.stat().st_mtime)
        return time.time() - newest > STALE_PARTIAL_SECONDS
    except OSError:
        return False


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a pod being stopped) raises KeyboardInterrupt, so cleanup runs; only where no
    other handler is installed, and only in the main thread (where signals are delivered)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_dataset(tmp: Path, job: _Job, tasks: Iterator, total: int | None, description: dict,
                   category_list: list[dict], issues: list, settings: dict) -> dict:
    """Writes shards, val_annotations.json and dataset.json into `tmp`; returns the summary."""
    # Lazy: the spawned worker processes import this module and must not load TensorFlow.
    from trainer.data import tfrecord

    source, shards, val_fraction = job.source, settings["shards"], job.val_fraction
    shard_counts = {"train": shards, "val": math.ceil(shards * val_fraction)}
    names = {split: shard_names(split, n) for split, n in shard_counts.items()}
    writers = {split: [tfrecord.tf.io.TFRecordWriter(str(tmp / name)) for name in files]
               for split, files in names.items()}
    coco_categories = [{"id": c["id"], "name": c["name"], "supercategory": source}
                       for c in category_list]
    val_json = CocoJsonWriter(tmp / "val_annotations.json", coco_categories)
    stats = {split: Counter() for split in SPLITS}
    # The fingerprint covers content as read, not where it was read from: the same data
    # under another path or bucket gives the same fingerprint.
    content = {k: v for k, v in description.items() if k not in ("annotations", "images")}
    fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
    bar = Progress("prepare", total, settings["progress"])
    done = skipped_images = 0
    encode = functools.partial(_encode_task, job)
    # COCO records go through native decoders (PIL, pycocotools): each runs in a worker
    # process, even with one worker, so that a crash costs one record, not the run.
    on_crash = functools.partial(_crashed, job) if source == "coco" else None
    for result in ordered_results(encode, tasks, settings["workers"], on_crash):
        issues.extend(result["issues"])
        done += 1
        if result["fields"] is None:
            skipped_images += 1
            reasons = ",".join(i.reason for i in result["issues"])
            fingerprint.update(f"{result['name']}:skipped:{reasons}\n".encode())
        else:
            split, fields = result["split"], result["fields"]
            fingerprint.update(f"{fields['source_id']}:{result['sha256']}\n".encode())
            split_stats = stats[split]
            shard = split_stats["images"] % shard_counts[split]
            writers[split][shard].write(tfrecord.encode_example(**fields))
            split_stats["images"] += 1
            split_stats["objects"] += len(fields["class_ids"])
            split_stats["crowd_objects"] += sum(fields["is_crowd"])
            if split == "val":
                val_json.add(result["coco_image"], result["coco_annotations"])
        bar.update(done, f", {skipped_images} skipped")
    bar.update(done, f", {skipped_images} skipped", final=True)
    for split_writers in writers.values():
        for writer in split_writers:
            writer.close()
    val_json.close()
    if not any(stats[split]["images"] for split in SPLITS):
        reasons = dict(Counter(i.reason for i in issues if i.action == coco.SKIPPED))
        raise UserError(f"no usable image in the {source} source ({done} read, skipped "
                        f"by reason: {reasons}): check --annotations/--images and "
                        "--categories")
    summary = {
        "format_version": FORMAT_VERSION,
        "source": description,
        "fingerprint": f"sha256:{fingerprint.hexdigest()}",
        "class_names": list(job.class_names),
        "categories": category_list,
        "options": {"val_fraction": val_fraction, "shards": shards, "seed": job.seed,
                    "categories": settings["categories"], "count": settings["count"]},
        "splits": {split: {"images": stats[split]["images"],
                           "objects": stats[split]["objects"],
                           "crowd_objects": stats[split]["crowd_objects"],
                           "shards": names[split]} for split in SPLITS},
        "val_annotations": "val_annotations.json",
        "images_read": done,
        "skipped_counts": dict(sorted(Counter(
            i.reason for i in issues if i.action == coco.SKIPPED).items())),
        "repaired_counts": dict(sorted(Counter(
            i.reason for i in issues if i.action == coco.REPAIRED).items())),
        "skipped": [i.to_json() for i in issues if i.action == coco.SKIPPED],
        "repaired": [i.to_json() for i in issues if i.action == coco.REPAIRED],
    }
    (tmp / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    (tmp / MARKER).write_text(f"written by mrcnn data prepare, format {FORMAT_VERSION}; the "
                              "folder is replaced as a whole when prepared again\n")
    return summary


def _written_by_prepare(name: str) -> bool:
    return name in (MARKER, "dataset.json", "val_annotations.json") or \
        SHARD_NAME.fullmatch(name) is not None


def _check_replaceable(out: Path) -> None:
    """`out` may be replaced only when it is absent, empty, or a folder this function's own
    runs wrote (the MARKER inside) that holds nothing else: the user's files are never lost."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a new folder")
    names = [path.name for path in out.iterdir()]
    if not names:
        return
    if MARKER not in names:
        raise UserError(f"--out {out} is not empty and was not written by `mrcnn data "
                        "prepare` (no marker file): choose a new folder or empty it")
    others = sorted(name for name in names if not _written_by_prepare(name))
    if others:
        raise UserError(f"--out {out} holds files that `mrcnn data prepare` did not write "
                        f"({', '.join(others[:3])}): move them away or choose a new folder")
