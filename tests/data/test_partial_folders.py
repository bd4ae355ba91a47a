"""A killed `data prepare` leaves its hidden partial folder; the next run removes it, and
never the folder of a run that is still alive."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.data.prepare import PARTIAL_LOCK, prepare_dataset, remove_stale_partials

QUIET = {"workers": 1, "progress": False}


def partial(parent: Path, name: str, lock: bool = True) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "train-00000-of-00001.tfrecord").write_bytes(b"half")
    if lock:
        (folder / PARTIAL_LOCK).write_text("")
    return folder


def test_only_dead_runs_partial_folders_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = partial(tmp_path, ".out.partial-0000000a")
    alive = partial(tmp_path, ".out.partial-0000000b")
    old_unlocked = partial(tmp_path, ".out.partial-0000000c", lock=False)
    fresh_unlocked = partial(tmp_path, ".out.partial-0000000d", lock=False)  # being published
    others = [partial(tmp_path, ".other.partial-0000000e"), partial(tmp_path, "out.partial-1")]
    two_hours_ago = time.time() - 7200
    for path in [old_unlocked, *old_unlocked.iterdir()]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    with open(alive / PARTIAL_LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the live writer holds it
        removed = remove_stale_partials(out)
    assert sorted(removed) == [dead, old_unlocked]
    assert all(p.is_dir() for p in [alive, fresh_unlocked, *others])


def test_the_next_run_removes_what_a_sigkill_left(tmp_path):
    script = ("import sys; from trainer.data.prepare import prepare_dataset; "
              "prepare_dataset('shapes', sys.argv[1], count=100000, image_size=64, workers=1)")
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], cwd=root,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)  # no cleanup can run
        process.wait(timeout=60)
    finally:
        process.kill()
    [left] = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".out.partial-")
    prepare_dataset("shapes", tmp_path / "out", count=2, image_size=64, **QUIET)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert PARTIAL_LOCK not in os.listdir(tmp_path / "out")
