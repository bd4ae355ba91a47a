"""trainer.data.prepare: bad records, atomic output, the split, val COCO json, gs:// sources."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from tests.data.conftest import HEIGHT, WIDTH, tiny_coco_dict, write_coco, write_image
from tests.servers import GcsEmulator, gcs_emulator
from trainer.cli import main as cli
from trainer.data import coco, shapes, tfrecord
from trainer.data.prepare import prepare_dataset, split_of
from trainer.data.workers import IN_FLIGHT_PER_WORKER, TASKS_PER_CHUNK, ordered_results
from trainer.errors import UserError

QUIET = {"workers": 1, "progress": False}


def _entries(summary: dict, key: str) -> list[tuple]:
    return sorted((e["record"], e.get("annotation_id"), e["reason"]) for e in summary[key])


def _bad_coco(root: Path) -> tuple[Path, Path]:
    """One good image holding every kind of bad object, plus every kind of bad image."""
    data = {"categories": [{"id": 1, "name": "thing"}], "images": [], "annotations": []}
    good = {"id": 1, "file_name": "good.png", "height": HEIGHT, "width": WIDTH}
    data["images"] += [
        good,
        {"id": 2, "file_name": "missing.png", "height": HEIGHT, "width": WIDTH},
        {"id": 3, "file_name": "broken.png", "height": HEIGHT, "width": WIDTH},
        {"id": 4, "file_name": "wrong_size.png", "height": HEIGHT, "width": WIDTH},
        {"id": 5, "file_name": "../outside.png", "height": HEIGHT, "width": WIDTH},
    ]
    square = [[10, 10, 20, 10, 20, 20, 10, 20]]
    def ann(ann_id: int, image_id: int = 1, **fields) -> dict:
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": square, "bbox": [10, 10, 10, 10], **fields}
    data["annotations"] += [
        ann(100),  # the one valid object
        ann(101, segmentation=[[1, 1, 5, 5]]),  # a polygon of 2 points
        ann(102, segmentation=[[50, 30, 70, 30, 70, 40, 50, 40]], bbox=[50, 30, 20, 10]),
        ann(103, segmentation=[[100, 100, 110, 100, 110, 110]], bbox=[100, 100, 10, 10]),
        ann(104, bbox=[10, 10, 0, 10]),  # zero width
        ann(105, segmentation=[[5, 5, 5, 5, 5, 5]], bbox=None),  # covers no pixel
        ann(106, category_id=99),
        ann(107, segmentation=[[30, 30, 40, 30, 40, 40], [1, 1]]),  # one bad part of two
        ann(108, image_id=2), ann(109, image_id=777),  # missing image; unknown image id
    ]
    annotations, images = write_coco(root, {**data, "images": [good]})
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_image(images / "wrong_size.png", 32, 32)
    write_image(root / "outside.png")  # exists, but outside the images folder
    annotations.write_text(json.dumps(data))
    return annotations, images


def test_each_bad_record_is_skipped_or_repaired_with_its_reason(tmp_path: Path) -> None:
    annotations, images = _bad_coco(tmp_path / "src")
    out = tmp_path / "out"
    summary = prepare_dataset("coco", out, annotations=str(annotations), images=str(images),
                              val_fraction=0.0, **QUIET)
    assert _entries(summary, "skipped") == sorted([
        ("good.png", 101, coco.POLYGON_TOO_FEW_POINTS),
        ("good.png", 103, coco.BOX_OUTSIDE_IMAGE),
        ("good.png", 104, coco.ZERO_AREA),
        ("good.png", 105, coco.ZERO_AREA),
        ("good.png", 106, coco.UNKNOWN_CATEGORY),
        ("missing.png", None, coco.MISSING_IMAGE),
        ("broken.png", None, coco.UNREADABLE_IMAGE),
        ("wrong_size.png", None, coco.SIZE_MISMATCH),
        ("../outside.png", None, coco.PATH_ESCAPES),
        ("777", 109, coco.UNKNOWN_IMAGE_ID),
    ])
    assert _entries(summary, "repaired") == [
        ("good.png", 102, coco.BOX_CLIPPED), ("good.png", 107, coco.POLYGON_TOO_FEW_POINTS)
    ]
    assert summary["skipped_counts"][coco.ZERO_AREA] == 2
    assert summary["splits"]["train"]["images"] == 1
    assert summary["splits"]["train"]["objects"] == 3  # 100, 102 (clipped), 107 (repaired)
    assert json.loads((out / "dataset.json").read_text())["skipped"] == summary["skipped"]
    [example] = tfrecord.read_examples([str(out / summary["splits"]["train"]["shards"][0])])
    # 102's box [x 50..70, y 30..40] clipped to the 64 px wide image: x2 = 64.
    np.testing.assert_allclose(example["boxes"].numpy()[1] * [HEIGHT, WIDTH, HEIGHT, WIDTH],
                               [30, 50, 40, 64], atol=1e-4)


def test_empty_result_is_a_user_error_and_leaves_nothing(tmp_path: Path) -> None:
    data = tiny_coco_dict()
    annotations, images = write_coco(tmp_path / "src", data)
    for entry in data["images"]:
        (images / entry["file_name"]).unlink()
    with pytest.raises(UserError, match=r"no usable image.*missing_image': 3"):
        prepare_dataset("coco", tmp_path / "out", annotations=str(annotations),
                        images=str(images), **QUIET)
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]


def test_interrupted_prepare_leaves_no_partial_output(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    prepare_dataset("shapes", out, count=3, image_size=64, **QUIET)
    before = (out / "dataset.json").read_text()
    real_encode, calls = tfrecord.encode_example, []

    def failing_encode(**fields) -> bytes:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return real_encode(**fields)

    monkeypatch.setattr(tfrecord, "encode_example", failing_encode)
    with pytest.raises(RuntimeError, match="injected"):
        prepare_dataset("shapes", out, count=8, image_size=64, **QUIET)
    with pytest.raises(RuntimeError, match="injected"):
        calls.clear()
        prepare_dataset("shapes", tmp_path / "new", count=8, image_size=64, **QUIET)
    # The previous complete output is untouched; no partial folder exists anywhere.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "dataset.json").read_text() == before


def test_sigterm_mid_run_leaves_no_partial_output(tmp_path: Path) -> None:
    """A real signal to a real process, as when Kubernetes stops a pod."""
    script = ("import sys; from trainer.data.prepare import prepare_dataset; "
              "prepare_dataset('shapes', sys.argv[1], count=100000, image_size=64, workers=1)")
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], cwd=root,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the run: records are being written
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "KeyboardInterrupt: terminated by SIGTERM" in stderr
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_not_a_dataset_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by `mrcnn data prepare`"):
        prepare_dataset("shapes", tmp_path, count=2, image_size=64, **QUIET)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_only_a_folder_prepare_wrote_itself_is_replaced(tmp_path: Path) -> None:
    # a dataset.json alone (even "{}") no longer makes a folder ours to replace
    user = tmp_path / "user"
    user.mkdir()
    (user / "dataset.json").write_text("{}")
    (user / "model.h5").write_bytes(b"the user's")
    with pytest.raises(UserError, match="no marker file"):
        prepare_dataset("shapes", user, count=2, image_size=64, **QUIET)
    assert sorted(p.name for p in user.iterdir()) == ["dataset.json", "model.h5"]
    # a folder prepare wrote is replaced whole, until the user puts a file of theirs in it
    ours = tmp_path / "ours"
    prepare_dataset("shapes", ours, count=2, image_size=64, **QUIET)
    assert (ours / ".mrcnn-prepared").is_file()
    prepare_dataset("shapes", ours, count=3, image_size=64, **QUIET)
    assert json.loads((ours / "dataset.json").read_text())["splits"]["train"]["images"] + \
        json.loads((ours / "dataset.json").read_text())["splits"]["val"]["images"] == 3
    (ours / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"did not write \(notes.txt\)"):
        prepare_dataset("shapes", ours, count=2, image_size=64, **QUIET)
    assert (ours / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "user"]


def test_a_dataset_moved_aside_by_a_killed_swap_is_restored_then_replaced(tmp_path: Path
                                                                          ) -> None:
    out = tmp_path / "data"
    prepare_dataset("shapes", out, count=2, image_size=64, **QUIET)
    out.rename(tmp_path / ".data.old-0123abcd")  # killed between replace_dir's two renames
    with pytest.raises(UserError, match="did not write"):  # restored, then checked as ever
        (tmp_path / ".data.old-0123abcd" / "notes.txt").write_text("keep me")
        prepare_dataset("shapes", out, count=3, image_size=64, **QUIET)
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    prepare_dataset("shapes", out, count=3, image_size=64, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_split_is_deterministic_and_stable_when_images_are_added(tmp_path: Path) -> None:
    small = prepare_dataset("shapes", tmp_path / "a", count=12, image_size=64,
                            val_fraction=0.3, **QUIET)
    again = prepare_dataset("shapes", tmp_path / "b", count=12, image_size=64,
                            val_fraction=0.3, workers=2, progress=False)  # other worker count
    large = prepare_dataset("shapes", tmp_path / "c", count=20, image_size=64,
                            val_fraction=0.3, **QUIET)

    def val_ids(name: str) -> set[int]:
        data = json.loads((tmp_path / name / "val_annotations.json").read_text())
        return {image["id"] for image in data["images"]}

    assert val_ids("a") == val_ids("b")
    assert small["fingerprint"] == again["fingerprint"]
    for name in small["splits"]["train"]["shards"]:  # byte-identical shards
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert val_ids("a") and val_ids("a") == {i for i in val_ids("c") if i < 12}
    assert large["fingerprint"] != small["fingerprint"]
    assert {split_of(str(i), 0, 0.3) for i in val_ids("c")} == {"val"}
    assert small["splits"]["train"]["images"] + small["splits"]["val"]["images"] == 12


def test_val_annotations_load_in_pycocotools_with_source_masks(tmp_path: Path) -> None:
    prepare_dataset("shapes", tmp_path / "ds", count=10, image_size=64, val_fraction=0.5,
                    **QUIET)
    val = COCO(str(tmp_path / "ds" / "val_annotations.json"))
    assert [c["name"] for c in val.loadCats(val.getCatIds())] == ["square", "circle", "triangle"]
    assert val.getImgIds()
    for image_id in val.getImgIds():
        sample = shapes.generate_sample(image_id, 64, 64)
        anns = val.loadAnns(val.getAnnIds(imgIds=[image_id]))
        assert [a["category_id"] for a in anns] == sample.class_ids.tolist()
        for i, ann in enumerate(anns):
            np.testing.assert_array_equal(val.annToMask(ann) > 0, sample.masks[:, :, i])
            y1, x1, y2, x2 = sample.boxes[i].tolist()
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]


def test_coco_val_annotations_keep_original_coordinates_and_crowds(
    tiny_coco: tuple[Path, Path], tmp_path: Path
) -> None:
    annotations, images = tiny_coco
    summary = prepare_dataset("coco", tmp_path / "ds", annotations=str(annotations),
                              images=str(images), val_fraction=0.9, seed=3, **QUIET)
    source, val = COCO(str(annotations)), COCO(str(tmp_path / "ds" / "val_annotations.json"))
    expected = {i for i in (10, 20, 30) if split_of(str(i), 3, 0.9) == "val"}
    assert set(val.getImgIds()) == expected and expected
    assert summary["splits"]["val"]["images"] == len(expected)
    to_ours = {3: 1, 7: 2, 11: 3}
    for image_id in expected:
        ours = val.loadAnns(val.getAnnIds(imgIds=[image_id]))
        theirs = source.loadAnns(source.getAnnIds(imgIds=[image_id]))
        assert [a["category_id"] for a in ours] == [to_ours[a["category_id"]] for a in theirs]
        assert [a["iscrowd"] for a in ours] == [a["iscrowd"] for a in theirs]
        for mine, original in zip(ours, theirs):
            np.testing.assert_array_equal(val.annToMask(mine), source.annToMask(original))


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[GcsEmulator]:
    monkeypatch.setenv("MRCNN_CACHE_DIR", str(tmp_path / "cache"))
    with gcs_emulator() as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        yield server


def test_gs_source_through_the_emulator(gcs: GcsEmulator, tiny_coco: tuple[Path, Path],
                                        tmp_path: Path) -> None:
    annotations, images = tiny_coco
    bucket = gcs.client().create_bucket("datasets")
    bucket.blob("tiny/instances.json").upload_from_filename(str(annotations))
    for path in images.rglob("*"):
        if path.is_file():
            name = path.relative_to(images).as_posix()
            bucket.blob(f"tiny/images/{name}").upload_from_filename(str(path))
    bucket.blob("tiny/images/c.png").delete()  # a missing object is a skipped record
    remote = prepare_dataset("coco", tmp_path / "remote", annotations="gs://datasets/tiny/"
                             "instances.json", images="gs://datasets/tiny/images",
                             val_fraction=0.0, **QUIET)
    assert remote["class_names"] == ["BG", "cat", "dog", "bird"]
    assert _entries(remote, "skipped") == [("c.png", None, coco.MISSING_IMAGE)]
    assert remote["splits"]["train"]["images"] == 2
    (images / "c.png").unlink()
    local = prepare_dataset("coco", tmp_path / "local", annotations=str(annotations),
                            images=str(images), val_fraction=0.0, **QUIET)
    for name in local["splits"]["train"]["shards"]:  # same bytes, same records
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert remote["fingerprint"] == local["fingerprint"]  # content, not location
    assert remote["source"]["images"] == "gs://datasets/tiny/images"


def test_cli_prints_the_summary_as_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["data", "prepare", "--out", str(tmp_path / "ds"), "--count", "3",
                     "--image-size", "64", "--workers", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["images_read"] == 3 and summary["class_names"][0] == "BG"
    assert "prepare: 3/3 (100%) images" in captured.err  # the progress line
    code = cli.main(["data", "prepare", "--out", str(tmp_path / "x"), "--source", "coco"])
    assert code == 2
    assert "needs --annotations" in capsys.readouterr().err


def test_tasks_are_pulled_lazily_into_a_bounded_pool() -> None:
    """Memory stays flat: the task iterator runs at most a fixed number of tasks ahead of the
    results consumed, whatever the dataset size; results keep task order."""
    pulled: list[int] = []

    def tasks() -> Iterator[int]:
        for i in range(300):
            pulled.append(i)
            yield -i

    bound = 2 * IN_FLIGHT_PER_WORKER * TASKS_PER_CHUNK
    for consumed, value in enumerate(ordered_results(abs, tasks(), workers=2), 1):
        assert value == consumed - 1
        assert len(pulled) - consumed <= bound
    assert consumed == 300


def test_shapes_category_subset_renumbers_classes(tmp_path: Path) -> None:
    summary = prepare_dataset("shapes", tmp_path / "ds", count=8, image_size=64,
                              categories=["circle"], val_fraction=0.0, **QUIET)
    assert summary["class_names"] == ["BG", "circle"]
    files = [str(tmp_path / "ds" / name) for name in summary["splits"]["train"]["shards"]]
    circles = 0
    for example in tfrecord.read_examples(files):
        sample = shapes.generate_sample(int(example["source_id"].numpy()), 64, 64)
        is_circle = sample.class_ids == 2  # "circle" in shapes.CLASS_NAMES
        assert example["class_ids"].numpy().tolist() == [1] * int(is_circle.sum())
        np.testing.assert_array_equal(example["masks"].numpy(), sample.masks[:, :, is_circle])
        circles += 1
    without = [i for i in range(8) if 2 not in shapes.generate_sample(i, 64, 64).class_ids]
    assert circles == 8 - len(without) > 0
    assert summary["skipped_counts"] == ({coco.NO_OBJECTS: len(without)} if without else {})


def test_masks_decode_to_0_and_1_as_model_garden_decodes_them(tmp_path: Path) -> None:
    """Model Garden's decoder: decode_png(channels=1, dtype=uint8), values used as they are."""
    import tensorflow as tf

    summary = prepare_dataset("shapes", tmp_path / "out", count=4, image_size=64, **QUIET)
    shard = tmp_path / "out" / summary["splits"]["train"]["shards"][0]
    values, objects = set(), 0
    for record in tf.data.TFRecordDataset(str(shard)):
        example = tf.train.Example.FromString(record.numpy())
        for png in example.features.feature["image/object/mask"].bytes_list.value:
            mask = tf.io.decode_png(png, channels=1, dtype=tf.uint8).numpy()
            values |= set(np.unique(mask).tolist())
            objects += 1
    assert objects > 0 and values == {0, 1}
