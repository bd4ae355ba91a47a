"""A writer that counts and hashes the bytes passing through it (for `storage` and its cache)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import BinaryIO

import google_crc32c

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes if known)

CHUNK_BYTES = 1 << 20


class HashingWriter:
    """A write-only file object that forwards to `out`, counting and hashing the bytes."""

    def __init__(self, out: BinaryIO, total: int | None, progress: Progress | None) -> None:
        self.out, self.total, self.progress, self.bytes = out, total, progress, 0
        self.hashes = {
            "sha256": hashlib.sha256(),
            "md5": hashlib.md5(usedforsecurity=False),
            "crc32c": google_crc32c.Checksum(),
        }

    def write(self, data: bytes) -> int:
        self.out.write(data)
        for digest in self.hashes.values():
            digest.update(data)
        self.bytes += len(data)
        if self.progress is not None:
            self.progress(self.bytes, self.total)
        return len(data)

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"].hexdigest()

    def b64digest(self, name: str) -> str:
        """The digest `name` ("crc32c" or "md5") in base64, as GCS reports it."""
        return base64.b64encode(self.hashes[name].digest()).decode("ascii")
