"""Transfers between gs://, http(s):// and local paths (plain or file://).

`download` fetches one object to a local file: retried with backoff on transient failures,
verified, moved into place only when complete, and cached so a rerun does not fetch it again.
With `STORAGE_EMULATOR_HOST` set (e.g. `http://127.0.0.1:9023`) gs:// goes to that emulator.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import ParseResult, urlparse
from urllib.request import url2pathname

import requests

from trainer.errors import StorageError
from trainer.io.atomic import atomic_file
from trainer.io.download_cache import (
    cache_entry,
    default_cache_dir,
    install_cached,
    store_cached,
)
from trainer.io.hashing import CHUNK_BYTES, HashingWriter, Progress

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_SECONDS = (10.0, 60.0)  # (connect, read between two chunks)
BACKOFF_SECONDS = 0.5  # pause before the first retry; doubles each retry (at most 30 s)
GCS_RETRY_SECONDS = 120.0  # the client library's retries of one GCS call give up after this


@dataclass(frozen=True)
class DownloadResult:
    """A finished download: where it is, its size and sha256 (hex), whether the cache gave it."""

    source: str
    path: Path
    bytes: int
    sha256: str
    from_cache: bool


class _Transient(Exception):
    """A failure worth retrying: connection, timeout, HTTP 408/429/5xx, a body cut short."""


# === URIs ===


def parse_uri(uri: str | Path) -> ParseResult:
    """`uri` split into its parts; a StorageError (one line) for a malformed one: a bad
    IPv6 host or port, or an http(s) URL without a host."""
    text = str(uri)
    try:
        parsed = urlparse(text)
        parsed.port  # parsing the port raises for a bad one
    except ValueError as err:
        raise StorageError(f"malformed URI {text!r} ({err}): expected gs://BUCKET/KEY, "
                           "https://HOST/PATH, file:///PATH or a path") from err
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise StorageError(f"no host in {text!r}: expected {parsed.scheme}://HOST/PATH")
    return parsed


def is_remote(uri: str | Path) -> bool:
    """True for gs://, http:// and https:// URIs; False for local paths and file:// URIs."""
    return parse_uri(uri).scheme in ("gs", "http", "https")


def _local_path(uri: str | Path) -> Path:
    """The path a plain local path or a file:// URI names."""
    text = str(uri)
    parsed = parse_uri(text)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    if len(parsed.scheme) > 1:  # a single letter is a Windows drive
        raise StorageError(f"unsupported URI {text}: use gs://, http(s)://, file:// or a path")
    return Path(text).expanduser()


def _split_gs(uri: str) -> tuple[str, str]:
    """`gs://bucket/some/key` -> ("bucket", "some/key"); the key may be empty."""
    bucket, _, key = uri.removeprefix("gs://").partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri}: expected gs://BUCKET/KEY")
    return bucket, key


# === Sources: open one, learn what its server states about it, stream it ===


@dataclass
class _Body:
    """An opened source: size and base64 checksums as its server states them, a `version`
    naming this content for the cache (None: do not cache), and how to stream it."""

    size: int | None
    version: str | None
    copy_to: Callable[[HashingWriter], None]
    checksums: dict[str, str] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _open_http(url: str) -> _Body:
    headers = {"Accept-Encoding": "identity"}  # bytes as stored, so Content-Length applies
    try:
        response = requests.get(url, stream=True, timeout=TIMEOUT_SECONDS, headers=headers)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Transient(f"cannot reach {url}: {type(err).__name__}") from err
    except requests.RequestException as err:  # a malformed URL, too many redirects, ...
        detail = " ".join(str(err).split())
        raise StorageError(f"cannot fetch {url}: {type(err).__name__}: {detail}") from err
    if (status := response.status_code) != 200:
        response.close()
        reason = f"HTTP {status} {response.reason} for {url}"
        raise (_Transient if status in (408, 429) or status >= 500 else StorageError)(reason)
    length = response.headers.get("Content-Length", "")
    encoded = response.headers.get("Content-Encoding", "identity") != "identity"
    size = int(length) if length.isdigit() and not encoded else None
    validator = response.headers.get("ETag") or response.headers.get("Last-Modified")

    def copy_to(out: HashingWriter) -> None:
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                out.write(chunk)
        except (requests.ConnectionError, requests.Timeout) as err:  # a read timeout too
            raise _Transient(f"connection to {url} lost: {type(err).__name__}") from err
        except requests.exceptions.ChunkedEncodingError as err:  # the body ended early
            if size is None:  # else `_verify` reports the shortfall against the size
                raise _Transient(f"body from {url} ended after {out.bytes} bytes") from err

    version = f"{validator}|{size}" if validator and size is not None else None
    return _Body(size=size, version=version, copy_to=copy_to, close=response.close)


@functools.lru_cache(maxsize=4)
def _client_for(emulator_host: str | None) -> Any:
    from google.cloud import storage

    if not emulator_host:
        return storage.Client()
    from google.auth.credentials import AnonymousCredentials

    endpoint = emulator_host if "://" in emulator_host else f"http://{emulator_host}"
    return storage.Client(
        project=os.environ.get("GOOGLE_CLOUD_PROJECT", "mrcnn-emulator"),
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )


def _gcs(uri: str, call: Callable[[Any], T]) -> T:
    """`call(client)` with a storage client (the emulator's if `STORAGE_EMULATOR_HOST` is set,
    else application-default credentials), its failures sorted into transient and final."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from google.cloud.storage.exceptions import DataCorruption

    try:
        return call(_client_for(os.environ.get("STORAGE_EMULATOR_HOST") or None))
    except api.NotFound as err:
        raise StorageError(f"not found: {uri}") from err
    except api.GoogleAPICallError as err:
        reason = f"HTTP {err.code} from GCS for {uri}: {err.message}".splitlines()[0]
        code = err.code or 0
        raise (_Transient if code in (408, 429) or code >= 500 else StorageError)(reason) from err
    except (requests.RequestException, auth.TransportError) as err:
        raise _Transient(f"connection to GCS failed for {uri}: {type(err).__name__}") from err
    except DataCorruption as err:
        raise StorageError(f"checksum mismatch for {uri}: the bytes differ from GCS's") from err
    except auth.DefaultCredentialsError as err:
        hint = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        raise StorageError(f"no Google Cloud credentials for {uri}: {hint}") from err
    except ValueError as err:  # the client library's own checks of names and arguments
        raise StorageError(f"malformed GCS URI {uri} ({err}): expected gs://BUCKET/KEY") from err


def _gcs_retry():
    """google-cloud-storage's own retry policy (transient errors and 408/429/5xx, exponential
    backoff), bounded so that a dead endpoint fails within GCS_RETRY_SECONDS."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(GCS_RETRY_SECONDS)


def _open_gcs(uri: str) -> _Body:
    bucket, key = _split_gs(uri)
    if not key:
        raise StorageError(f"no object name in {uri}: expected gs://BUCKET/KEY")
    blob = _gcs(uri, lambda c: c.bucket(bucket).get_blob(key, retry=_gcs_retry(),
                                                         timeout=TIMEOUT_SECONDS))
    if blob is None:
        raise StorageError(f"not found: {uri}")

    def copy_to(out: HashingWriter) -> None:
        # The client library retries with its own policy and resumes an interrupted body with
        # a range request pinned to the generation measured above (`blob` carries it), and
        # checks crc32c on a whole response; `_verify` checks it again over every byte, which
        # covers resumed downloads (the library skips the check on partial responses). Raw
        # bytes (no gzip transcoding) are what the crc32c and md5 describe.
        _gcs(uri, lambda _: blob.download_to_file(
            out, raw_download=True, checksum="crc32c", retry=_gcs_retry(),
            timeout=TIMEOUT_SECONDS))

    checksums = {"crc32c": blob.crc32c, "md5": blob.md5_hash}
    return _Body(
        size=blob.size,
        version=f"generation={blob.generation}|{blob.size}",
        copy_to=copy_to,
        checksums={name: value for name, value in checksums.items() if value},
    )


def _open_local(uri: str) -> _Body:
    path = _local_path(uri)
    if not path.is_file():
        raise StorageError(f"not found: {uri}" + (" (a directory)" if path.is_dir() else ""))

    def copy_to(out: HashingWriter) -> None:
        with path.open("rb") as source:
            shutil.copyfileobj(source, out, CHUNK_BYTES)

    return _Body(size=path.stat().st_size, version=None, copy_to=copy_to)


def _open(uri: str) -> _Body:
    if uri.startswith("gs://"):
        return _open_gcs(uri)
    return _open_http(uri) if is_remote(uri) else _open_local(uri)


def _verify(source: str, out: HashingWriter, body: _Body, sha256: str | None) -> None:
    if body.size is not None and out.bytes < body.size:
        raise _Transient(f"truncated body from {source}: got {out.bytes} of {body.size} bytes")
    if body.size is not None and out.bytes > body.size:
        raise StorageError(f"size mismatch for {source}: got more than {body.size} bytes")
    for name, expected in body.checksums.items():
        if (got := out.b64digest(name)) != expected:
            raise StorageError(f"{name} mismatch for {source}: server says {expected}, got {got}")
    if sha256 is not None and (got := out.sha256) != sha256:
        raise StorageError(f"checksum mismatch for {source}: expected sha256 {sha256}, got {got}")


def _with_retries(action: Callable[[], T], retries: int, backoff_seconds: float) -> T:
    """`action()`, called again after a growing, jittered pause each time it fails transiently."""
    attempt = 0
    while True:
        try:
            return action()
        except _Transient as err:
            if attempt >= retries:
                raise StorageError(f"{err} (gave up after {attempt + 1} attempts)") from err
            delay = min(30.0, backoff_seconds * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            log.warning("%s; retry %d of %d in %.2f s", err, attempt, retries, delay)
            time.sleep(delay)


# === Public API ===


def download(
    source: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    retries: int = 4,
    progress: Progress | None = None,
    backoff_seconds: float = BACKOFF_SECONDS,
) -> DownloadResult:
    """Fetch `source` (gs://, http(s)://, file:// or a local path) to the file `dest`.

    Transient failures are retried `retries` times, pausing `backoff_seconds`, then doubling.
    `dest` appears only complete and verified (size, GCS's crc32c/md5, `sha256` if given); on
    failure it stays as it was. Remote sources are cached in `cache_dir` (default
    `default_cache_dir()`) under source + `sha256`, else source + the server's version (ETag
    or generation) and size. `progress(done, total)` is called per chunk. Raises
    `StorageError` with a one-line reason."""
    source, dest = str(source), Path(dest).expanduser()
    expected = sha256.strip().lower() if sha256 else None
    cache = Path(cache_dir or default_cache_dir()).expanduser() if is_remote(source) else None

    def from_cache(version: str | None) -> DownloadResult | None:
        if cache is None or version is None:
            return None
        hit = install_cached(cache_entry(cache, source, version), dest, progress)
        return DownloadResult(source, dest, hit[0], hit[1], True) if hit else None

    pinned = f"sha256={expected}" if expected else None
    if result := from_cache(pinned):  # the expected sha256 is known: no request at all
        return result

    def attempt() -> DownloadResult:
        body = _open(source)
        try:
            version = pinned or body.version
            if not pinned and (result := from_cache(version)):
                return result
            with atomic_file(dest) as out:
                writer = HashingWriter(out, body.size, progress)
                body.copy_to(writer)
                _verify(source, writer, body, expected)
        finally:
            body.close()
        if cache is not None and version is not None:
            store_cached(cache_entry(cache, source, version), dest, writer.sha256)
        return DownloadResult(source, dest, writer.bytes, writer.sha256, False)

    # gs:// is retried (and resumed) inside the client library; only http(s) is retried here.
    return _with_retries(attempt, 0 if source.startswith("gs://") else retries, backoff_seconds)


def upload(path: str | Path, dest_uri: str, *, retries: int = 4) -> str:
    """Copy the local file `path` to `dest_uri` (gs:// or local) and return `dest_uri`.
    Local copies are atomic; GCS checks the upload's crc32c."""
    src, dest_uri = _local_path(path), str(dest_uri)
    if not src.is_file():
        raise StorageError(f"not found: {src}")
    if dest_uri.startswith("gs://"):
        bucket, key = _split_gs(dest_uri)

        def put(client: Any) -> None:
            blob = client.bucket(bucket).blob(key)
            kwargs = {"checksum": "crc32c", "retry": None, "timeout": TIMEOUT_SECONDS}
            blob.upload_from_filename(str(src), **kwargs)

        _with_retries(lambda: _gcs(dest_uri, put), retries, BACKOFF_SECONDS)
        return dest_uri
    if is_remote(dest_uri):
        raise StorageError(f"cannot upload to {dest_uri}: only gs:// and local destinations")
    with src.open("rb") as source, atomic_file(_local_path(dest_uri)) as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)
    return dest_uri


def read_bytes(uri: str) -> bytes:
    """The whole content of `uri` (gs://, file:// or a local path), retried like `download`.
    GCS objects stored gzip-encoded come back decompressed; the client checks their crc32c."""
    uri = str(uri)
    if uri.startswith("gs://"):
        bucket, key = _split_gs(uri)

        def get(client: Any) -> bytes:
            blob = client.bucket(bucket).blob(key)
            return blob.download_as_bytes(retry=None, timeout=TIMEOUT_SECONDS)

        return _with_retries(lambda: _gcs(uri, get), 4, BACKOFF_SECONDS)
    if is_remote(uri):
        raise StorageError(f"cannot read {uri} in memory: download it instead")
    try:
        return _local_path(uri).read_bytes()
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err.strerror}") from err


def list_uris(prefix_uri: str) -> list[str]:
    """Every object under `prefix_uri`, sorted, as URIs in the prefix's own form.

    A gs:// prefix is a plain prefix of object names, as GCS lists them. Locally a directory
    lists every file below it; otherwise the files whose path starts with the prefix."""
    prefix_uri = str(prefix_uri)
    if prefix_uri.startswith("gs://"):
        bucket, prefix = _split_gs(prefix_uri)

        def names(client: Any) -> list[str]:
            blobs = client.list_blobs(bucket, prefix=prefix, retry=None, timeout=TIMEOUT_SECONDS)
            return [blob.name for blob in blobs if not blob.name.endswith("/")]

        found = _with_retries(lambda: _gcs(prefix_uri, names), 4, BACKOFF_SECONDS)
        return sorted(f"gs://{bucket}/{name}" for name in found)
    if is_remote(prefix_uri):
        raise StorageError(f"cannot list {prefix_uri}: only gs:// and local prefixes")
    prefix = _local_path(prefix_uri)
    root = prefix if prefix.is_dir() else prefix.parent
    files = [Path(top) / name for top, _, names in os.walk(root) for name in names]
    files = [path for path in files if str(path).startswith(str(prefix))]
    as_uri = urlparse(prefix_uri).scheme == "file"
    return sorted(path.absolute().as_uri() if as_uri else str(path) for path in files)

