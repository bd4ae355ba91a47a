"""trainer.weights.checkpoints: the one way to find the newest checkpoint."""

from pathlib import Path

import pytest

from trainer.errors import UserError
from trainer.weights.checkpoints import find_last_checkpoint, newest_in_folder


def make_run(model_dir: Path, folder: str, *files: str) -> None:
    (model_dir / folder).mkdir(parents=True)
    for name in files:
        (model_dir / folder / name).write_bytes(b"")


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
