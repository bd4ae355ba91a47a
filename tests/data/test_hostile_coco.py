"""Hostile COCO input: checked before pycocotools sees it, and a native crash while decoding
one record skips that record (with one worker or many) instead of ending the run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.data.conftest import tiny_coco_dict, write_coco
from trainer.data import coco
from trainer.data.prepare import prepare_dataset
from trainer.data.workers import ordered_results

TRIANGLE = [5.0, 5.0, 30.0, 5.0, 5.0, 30.0]


def hostile_coco(root: Path) -> tuple[Path, Path]:
    """tiny_coco with four more objects on a.png (48x64), each hostile in its own way."""
    data = tiny_coco_dict()
    size = [48, 64]
    hostile = {
        # pycocotools' rasteriser crashes (SIGSEGV) on a point this far out.
        201: [[5.0, 5.0, 1e9, 5.0, 5.0, 30.0]],
        # Counts summing to less than 48 x 64: pycocotools fills the rest from uninitialised
        # memory; "1" is valid RLE text that decodes to one run of 1 pixel.
        202: {"size": size, "counts": "1"},
        203: {"size": size, "counts": "\x7f\x7f garbage"},  # not RLE text at all
        204: {"size": size, "counts": [10, 20]},  # uncompressed, 30 pixels of 3072
    }
    for ann_id, segmentation in hostile.items():
        data["annotations"].append({"id": ann_id, "image_id": 10, "category_id": 3,
                                    "iscrowd": 0, "segmentation": segmentation,
                                    "bbox": [5.0, 5.0, 25.0, 25.0]})
    data["annotations"].append({"id": 205, "image_id": 10, "category_id": 3, "iscrowd": 0,
                                "segmentation": [TRIANGLE, [-40.0, -30.0, 100.0, 70.0, 0, 0]],
                                "bbox": [5.0, 5.0, 25.0, 25.0]})  # out, within the margin
    return write_coco(root, data)


@pytest.mark.parametrize("workers", [1, 2])
def test_hostile_segmentations_are_skipped_with_their_reason(tmp_path, workers):
    annotations, images = hostile_coco(tmp_path / "src")
    summary = prepare_dataset("coco", tmp_path / "out", annotations=str(annotations),
                              images=str(images), val_fraction=0.0, workers=workers,
                              progress=False)
    reasons = {entry["annotation_id"]: entry["reason"] for entry in summary["skipped"]}
    assert reasons == {201: coco.COORDINATES_OUT_OF_RANGE, 202: coco.BAD_SEGMENTATION,
                       203: coco.BAD_SEGMENTATION, 204: coco.BAD_SEGMENTATION}
    assert summary["splits"]["train"]["images"] == 3  # every image kept, 205 too
    assert summary["splits"]["train"]["objects"] == 6


def test_compressed_rle_counts_decode_as_pycocotools_encodes():
    # pycocotools' encoding of a 4x4 mask with 2 pixels on, then 14 off: runs 0, 2, 14.
    assert coco.compressed_rle_counts(b"02>") == [0, 2, 14]
    with pytest.raises(ValueError, match="ends inside a number"):
        coco.compressed_rle_counts(b"0P")  # 0x20 set on the last char: more was promised
    with pytest.raises(ValueError, match="not compressed RLE text"):
        coco.compressed_rle_counts(b"0 ")


def crash_on_three(task: int) -> int:
    """A decoder that crashes natively (as pycocotools did) on task 3."""
    if task == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    return task * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_a_native_crash_costs_one_record_not_the_run(workers):
    results = list(ordered_results(crash_on_three, range(20), workers,
                                   on_crash=lambda task: ("crashed", task)))
    assert results == [t * 10 if t != 3 else ("crashed", 3) for t in range(20)]
