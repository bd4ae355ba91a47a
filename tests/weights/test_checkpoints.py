"""trainer.weights.checkpoints: the one way to find the newest checkpoint, run folders of
their own, leftovers and retention."""

import datetime
import logging
from pathlib import Path

import numpy as np
import pytest

from trainer.errors import UserError
from trainer.weights.checkpoints import (
    create_run_folder,
    find_last_checkpoint,
    newest_in_folder,
    optimizer_path,
    prune_checkpoints,
    remove_leftovers,
)
from trainer.weights.h5layout import write_layout

NOW = datetime.datetime(2026, 1, 1, 12, 0)


def make_run(model_dir: Path, folder: str, *files: str) -> None:
    """A run folder with (valid, empty) weights files of the given names."""
    (model_dir / folder).mkdir(parents=True, exist_ok=True)
    for name in files:
        write_layout(model_dir / folder / name, {}, keras_version="3")


def test_find_last_checkpoint(tmp_path):
    make_run(tmp_path, "demo20250101T1200", "mask_rcnn_demo_0001.h5", "mask_rcnn_demo_0009.h5")
    make_run(tmp_path, "demo20250102T0900", "mask_rcnn_demo_0002.h5", "mask_rcnn_demo_0010.h5",
             ".mask_rcnn_demo_0011.h5.tmp")  # a checkpoint being written
    make_run(tmp_path, "demo20250103T0000")  # started, no epoch finished yet
    make_run(tmp_path, "shapes20260101T0000", "mask_rcnn_shapes_0003.h5")  # another config
    assert find_last_checkpoint(tmp_path, "demo") == \
        tmp_path / "demo20250102T0900" / "mask_rcnn_demo_0010.h5"
    assert find_last_checkpoint(tmp_path).name == "mask_rcnn_shapes_0003.h5"
    with pytest.raises(UserError, match="no 'coco' checkpoint"):
        find_last_checkpoint(tmp_path, "coco")
    with pytest.raises(UserError, match="not a folder"):
        find_last_checkpoint(tmp_path / "missing", "demo")


def test_newest_in_folder_orders_by_epoch_not_by_name(tmp_path):
    make_run(tmp_path, "out", "mask_rcnn_demo_0009.h5", "mask_rcnn_demo_0010.h5",
             "mask_rcnn_demo_0100.h5.part", "weights.h5", "summary.json")
    assert newest_in_folder(tmp_path / "out") == tmp_path / "out" / "mask_rcnn_demo_0010.h5"
    assert newest_in_folder(tmp_path / "out", "other") is None
    make_run(tmp_path, "empty")
    assert newest_in_folder(tmp_path / "empty") is None


def test_runs_started_in_the_same_minute_get_folders_of_their_own(tmp_path):
    first = create_run_folder(tmp_path, "Demo", NOW)
    second = create_run_folder(tmp_path, "demo", NOW)
    folders = [create_run_folder(tmp_path, "demo", NOW) for _ in range(9)]
    assert first.name == "demo20260101T1200"  # matterport's name while it is free
    assert second.name == "demo20260101T1200_2"
    assert folders[-1].name == "demo20260101T1200_11"
    assert all(folder.is_dir() for folder in [first, second, *folders])
    # The newest run of the minute wins, _11 after _9 (numbers, not text).
    make_run(tmp_path, "demo20260101T1200_9", "mask_rcnn_demo_0005.h5")
    make_run(tmp_path, "demo20260101T1200_11", "mask_rcnn_demo_0001.h5")
    make_run(tmp_path, "demo20260101T1200", "mask_rcnn_demo_0009.h5")
    assert find_last_checkpoint(tmp_path, "demo").parent.name == "demo20260101T1200_11"
    make_run(tmp_path, "demo20260101T1201", "mask_rcnn_demo_0001.h5")  # a later minute
    assert find_last_checkpoint(tmp_path, "demo").parent.name == "demo20260101T1201"


def test_an_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    make_run(tmp_path, "demo20260101T1200", "mask_rcnn_demo_0001.h5", "mask_rcnn_demo_0002.h5",
             "mask_rcnn_demo_0003.h5")
    folder = tmp_path / "demo20260101T1200"
    np.savez(optimizer_path(folder / "mask_rcnn_demo_0002.h5"), variable_names=np.asarray(["a"]))
    optimizer_path(folder / "mask_rcnn_demo_0003.h5").write_bytes(b"PK\x03\x04 cut")
    data = (folder / "mask_rcnn_demo_0002.h5").read_bytes()
    (folder / "mask_rcnn_demo_0002.h5").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        assert find_last_checkpoint(tmp_path, "demo") == folder / "mask_rcnn_demo_0001.h5"
    assert "mask_rcnn_demo_0003.h5" in caplog.text and "optimizer state" in caplog.text
    assert "mask_rcnn_demo_0002.h5" in caplog.text and "truncated" in caplog.text


def test_leftovers_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    make_run(tmp_path, "demo20260101T1200", "mask_rcnn_demo_0001.h5")
    folder = tmp_path / "demo20260101T1200"
    np.savez(optimizer_path(folder / "mask_rcnn_demo_0001.h5"), x=np.zeros(1))
    leftovers = [".mask_rcnn_demo_0002.h5.0123abcd.part",
                 ".mask_rcnn_demo_0002.optimizer.npz.89abcdef.part",
                 "mask_rcnn_demo_0002.optimizer.npz"]  # its weights file never came
    kept = ["notes.txt", ".other.h5.0123abcd.part", "mask_rcnn_demo_0001.h5",
            "mask_rcnn_demo_0001.optimizer.npz", "events.out.tfevents.1"]
    for name in leftovers + kept[:3] + kept[4:]:
        (folder / name).write_bytes(b"x")
    removed = remove_leftovers(folder, "demo")
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    names = [f"mask_rcnn_demo_{epoch:04d}.h5" for epoch in range(1, 6)]
    make_run(tmp_path, "run", *names)
    folder = tmp_path / "run"
    for name in names:
        np.savez(optimizer_path(folder / name), x=np.zeros(1))
    removed = prune_checkpoints(folder, "demo", 2, protected=[folder / names[1]])
    assert sorted(p.name for p in removed) == [names[0], names[2]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [n for n in names if n not in (names[0], names[2])]
        + [optimizer_path(folder / n).name for n in (names[1], names[3], names[4])])
    with pytest.raises(UserError, match="at least 1"):
        prune_checkpoints(folder, "demo", 0)
