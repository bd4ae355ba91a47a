"""The download cache: one folder per (source, version), holding one file named by its sha256,
so an entry whose content changed is recognised and ignored."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from trainer.errors import StorageError
from trainer.io.atomic import atomic_file
from trainer.io.hashing import CHUNK_BYTES, HashingWriter, Progress

log = logging.getLogger("trainer.io.storage")  # storage's logger, as before this module split off


def default_cache_dir() -> Path:
    """`$MRCNN_CACHE_DIR` if set, else `~/.cache/mrcnn`."""
    return Path(os.environ.get("MRCNN_CACHE_DIR") or Path.home() / ".cache" / "mrcnn")


def cache_entry(cache_dir: Path, source: str, version: str) -> Path:
    """The cache folder for one version of `source`; it holds one file named by its sha256."""
    return cache_dir / hashlib.sha256(f"{source}\n{version}".encode()).hexdigest()


def install_cached(entry: Path, dest: Path, progress: Progress | None) -> tuple[int, str] | None:
    """Copy the file in `entry` to `dest` if its content still matches its name (its sha256);
    returns (bytes, sha256), or None when there is no intact entry."""
    stored = next(entry.glob("[0-9a-f]" * 64), None) if entry.is_dir() else None
    if stored is None:
        return None
    try:
        with stored.open("rb") as cached, atomic_file(dest) as out:
            writer = HashingWriter(out, stored.stat().st_size, progress)
            shutil.copyfileobj(cached, writer, CHUNK_BYTES)
            if writer.sha256 != stored.name:
                raise ValueError("its content changed since it was stored")
    except (OSError, ValueError) as err:
        log.warning("ignoring cache entry %s: %s", stored, err)
        return None
    return writer.bytes, writer.sha256


def store_cached(entry: Path, path: Path, sha256: str) -> None:
    """Keep a copy of `path` in `entry`; a cache that cannot be written only warns."""
    try:
        with path.open("rb") as src, atomic_file(entry / sha256) as out:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
    except (OSError, StorageError) as err:
        log.warning("could not cache %s in %s: %s", path, entry, err)
