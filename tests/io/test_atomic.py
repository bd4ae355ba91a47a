"""trainer.io.atomic: a result appears whole or not at all, and a failure leaves the old file."""

import os

import pytest

from trainer.io.atomic import atomic_file, atomic_path, copy_atomic, write_atomic


def test_write_replaces_the_destination_and_leaves_no_temporary_file(tmp_path):
    dest = tmp_path / "sub" / "metrics.json"
    write_atomic(dest, "first")
    write_atomic(dest, b"second")
    assert dest.read_bytes() == b"second"
    assert os.listdir(dest.parent) == ["metrics.json"]


def test_a_failing_block_keeps_the_old_file_and_removes_its_temporary_one(tmp_path):
    dest = tmp_path / "weights.h5"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(dest) as out:
        out.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.h5"]
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.h5") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["weights.h5"]


def test_the_path_form_is_renamed_only_when_the_block_ends(tmp_path):
    dest = tmp_path / "checkpoint.h5"
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"complete")
        assert tmp.parent == tmp_path and not dest.exists()
    assert dest.read_bytes() == b"complete"
    copy_atomic(dest, tmp_path / "copy" / "checkpoint.h5")
    assert (tmp_path / "copy" / "checkpoint.h5").read_bytes() == b"complete"


def test_replace_dir_swaps_a_finished_folder_in_whole(tmp_path):
    from trainer.io.atomic import replace_dir

    dest = tmp_path / "dataset"
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "a").write_text("1")
    replace_dir(tmp_path / "first", dest)  # no previous folder
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "b").write_text("2")
    replace_dir(tmp_path / "second", dest)  # the old one moved aside, then deleted
    assert os.listdir(dest) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["dataset"]


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    from trainer.io.atomic import restore_replaced

    dest = tmp_path / "dataset"
    (tmp_path / ".dataset.old-0000aaaa").mkdir()  # an older leftover
    aside = tmp_path / ".dataset.old-0123abcd"
    aside.mkdir()
    (aside / "a").write_text("previous")
    os.utime(tmp_path / ".dataset.old-0000aaaa", (1, 1))
    assert restore_replaced(dest) == dest  # dest was missing: the newest is moved back
    assert (dest / "a").read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["dataset"]
    (tmp_path / ".dataset.old-0123abcd").mkdir()  # beside a present dest: a finished swap's
    assert restore_replaced(dest) is None
    assert sorted(os.listdir(tmp_path)) == ["dataset"] and os.listdir(dest) == ["a"]
