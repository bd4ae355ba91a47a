"""The one atomic write: whatever a command writes as a result appears whole or not at all.

A temporary file in the destination's own folder is written, flushed and fsynced, renamed over
the destination, and the folder is fsynced so the rename survives a crash. On any error the
temporary file is removed and the destination, present or not, is left as it was. A process
killed mid-write (SIGKILL, power loss) leaves its temporary file behind: `remove_temporaries`
deletes such leftovers in a folder that no other process is writing to.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from trainer.errors import StorageError

# `.{dest name}.{8 hex digits}.part`: what atomic_path writes before the rename.
TEMPORARY_NAME = re.compile(r"^\.(?P<dest>.+)\.[0-9a-f]{8}\.part$")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """A fresh path beside `dest` for the block to create a file at (for writers that want a
    path, such as h5py); it replaces `dest` only when the block completes."""
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"  # TEMPORARY_NAME
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot write {dest}: {err.strerror}") from err
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(dest.parent)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[BinaryIO]:
    """A new binary file beside `dest` that replaces it only if the block completes."""
    with atomic_path(dest) as tmp:
        try:
            out = open(tmp, "xb")
        except OSError as err:
            raise StorageError(f"cannot write {dest}: {err.strerror}") from err
        with out:
            yield out


def write_atomic(dest: str | os.PathLike, data: bytes | str) -> None:
    """`data` (text is written as UTF-8) as the whole content of `dest`."""
    with atomic_file(dest) as out:
        out.write(data.encode() if isinstance(data, str) else data)


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """A copy of the file `src` at `dest`."""
    with open(src, "rb") as source, atomic_file(dest) as out:
        shutil.copyfileobj(source, out, 1 << 20)


def remove_temporaries(folder: str | os.PathLike, dest_pattern: str = ".*") -> list[Path]:
    """Deletes the temporary files that interrupted atomic writes left in `folder` (those of
    destinations whose name fully matches `dest_pattern`); returns what was deleted. Only for
    a folder no other process writes to at the time: a live writer would lose its file."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = TEMPORARY_NAME.match(path.name)
        if match and re.fullmatch(dest_pattern, match["dest"]) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def replace_dir(complete: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Moves the finished folder `complete` (written beside `dest`) to `dest`. An existing
    `dest` is replaced only now, by two renames: it is moved aside, the new one moved in,
    then the old one deleted."""
    complete, dest = Path(complete), Path(dest)
    if not dest.exists():
        os.rename(complete, dest)
        return
    old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
    os.rename(dest, old)
    os.rename(complete, dest)
    shutil.rmtree(old, ignore_errors=True)


def restore_replaced(dest: str | os.PathLike) -> Path | None:
    """Undoes a replace_dir killed between its two renames: `dest` is missing and its previous
    folder sits aside as `.{dest}.old-*`; that folder is moved back (the newest, should there
    be several) and returned. Leftover `.old-*` folders beside a present `dest` are a finished
    swap's and are deleted. Call it before deciding what to do with `dest`."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return None
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.old-[0-9a-f]{{8}}")
    aside = sorted((p for p in dest.parent.iterdir() if pattern.fullmatch(p.name) and
                    p.is_dir() and not p.is_symlink()), key=lambda p: p.stat().st_mtime)
    restored = None
    if aside and not os.path.lexists(dest):
        restored = aside.pop()
        os.rename(restored, dest)
    for folder in aside:
        shutil.rmtree(folder, ignore_errors=True)
    return dest if restored else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
