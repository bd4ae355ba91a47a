"""The one atomic write: whatever a command writes as a result appears whole or not at all.

A temporary file in the destination's own folder is written, flushed and fsynced, renamed over
the destination, and the folder is fsynced so the rename survives a crash. On any error the
temporary file is removed and the destination, present or not, is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from trainer.errors import StorageError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """A fresh path beside `dest` for the block to create a file at (for writers that want a
    path, such as h5py); it replaces `dest` only when the block completes."""
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
