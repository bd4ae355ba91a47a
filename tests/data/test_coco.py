"""trainer.data.coco against pycocotools' own decoding of a tiny, PIL-written COCO dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from tests.data.conftest import tiny_coco_dict, write_coco
from trainer.data import coco
from trainer.errors import UserError


def _read_all(source: coco.CocoSource) -> dict[int, tuple]:
    issues: list[coco.Issue] = []
    results = {}
    for task in source.tasks(issues):
        image, task_issues = coco.read_task(source.context, task)
        results[task.image["id"]] = (image, task_issues)
    assert issues == []
    return results


def test_masks_equal_pycocotools_ann_to_mask(tiny_coco: tuple[Path, Path]) -> None:
    annotations, images = tiny_coco
    reference = COCO(str(annotations))
    source = coco.CocoSource(str(annotations), str(images))
    assert source.class_names == ("BG", "cat", "dog", "bird")  # COCO ids 3, 7, 11 -> 1, 2, 3
    results = _read_all(source)
    assert sorted(results) == [10, 20, 30]
    for image_id, (image, issues) in results.items():
        assert issues == []
        anns = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
        assert image.masks.shape == (48, 64, len(anns))
        for i, ann in enumerate(anns):
            # Polygons (incl. two-part), compressed RLE, uncompressed RLE, crowd: all equal.
            np.testing.assert_array_equal(image.masks[:, :, i], reference.annToMask(ann) > 0)
            assert image.masks[:, :, i].sum() > 0
        expected_ids = [{3: 1, 7: 2, 11: 3}[ann["category_id"]] for ann in anns]
        assert image.class_ids.tolist() == expected_ids
        assert image.is_crowd.tolist() == [bool(ann["iscrowd"]) for ann in anns]
        x, y, w, h = anns[0]["bbox"]
        np.testing.assert_allclose(image.boxes[0], [y, x, y + h, x + w])
    # The crowd region of b.jpg is kept and flagged.
    assert results[20][0].is_crowd.tolist() == [False, True]


def test_image_bytes_are_stored_as_read(tiny_coco: tuple[Path, Path]) -> None:
    annotations, images = tiny_coco
    source = coco.CocoSource(str(annotations), str(images))
    results = _read_all(source)
    jpeg = results[20][0]
    assert jpeg.image_format == "jpeg"
    assert jpeg.filename == "sub/b.jpg"
    assert jpeg.image_encoded == (images / "sub" / "b.jpg").read_bytes()
    assert results[10][0].image_format == "png"


def test_category_subset_keeps_names_and_source_order(tiny_coco: tuple[Path, Path]) -> None:
    annotations, images = tiny_coco
    source = coco.CocoSource(str(annotations), str(images), categories=["bird", "cat"])
    assert source.class_names == ("BG", "cat", "bird")  # by COCO id (3, 11), not CLI order
    results = _read_all(source)
    image_b, _ = results[20]
    assert image_b.class_ids.tolist() == [2, 1]  # bird, then the crowd cat
    image_c, issues_c = results[30]  # only a dog: nothing left
    assert image_c is None
    assert [i.reason for i in issues_c] == [coco.NO_OBJECTS]
    image_a, issues_a = results[10]  # the dog is filtered on purpose: no issue for it
    assert image_a.class_ids.tolist() == [1]
    assert issues_a == []


def test_unknown_category_name_is_a_user_error(tiny_coco: tuple[Path, Path]) -> None:
    annotations, images = tiny_coco
    with pytest.raises(UserError, match=r"unknown categories \['zebra'\].*'bird', 'cat', 'dog'"):
        coco.CocoSource(str(annotations), str(images), categories=["zebra"])


def test_not_a_coco_json_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not a COCO instances JSON.*categories"):
        coco.CocoSource(str(path), str(tmp_path))


def test_malformed_entries_are_reported_not_raised(tmp_path: Path) -> None:
    data = tiny_coco_dict()
    annotations, images = write_coco(tmp_path, data)
    data["images"] += ["not an object", dict(data["images"][0]),  # a string; a repeated id
                       {"id": 40, "file_name": "d.png", "height": "48", "width": 64}]
    data["annotations"] += [7, {"id": 9, "image_id": 30, "category_id": 7,
                                "segmentation": "oops", "bbox": [1, 1, 2, 2]}]
    annotations.write_text(json.dumps(data))
    source = coco.CocoSource(str(annotations), str(images))
    issues: list[coco.Issue] = []
    tasks = list(source.tasks(issues))
    assert [(i.record, i.reason) for i in issues] == [
        ("images[3]", coco.BAD_IMAGE_ENTRY), ("a.png", coco.DUPLICATE_IMAGE_ID)]
    image_d, issues_d = coco.read_task(source.context, tasks[-1])
    assert image_d is None and [i.reason for i in issues_d] == [coco.BAD_IMAGE_ENTRY]
    image_c, issues_c = coco.read_task(source.context, tasks[2])  # keeps its good object
    assert image_c.class_ids.tolist() == [2]
    assert [(i.annotation_id, i.reason) for i in issues_c] == [(9, coco.BAD_SEGMENTATION)]
