"""trainer.io.storage against real servers on 127.0.0.1: a GCS emulator and a scripted HTTP
server."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import GcsEmulator, HttpServer, cutting_proxy, http_server
from trainer.errors import StorageError, UserError
from trainer.io import storage

PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff_seconds": 0.001}  # retries still happen, without the production pauses



@pytest.fixture
def http() -> Iterator[HttpServer]:
    with http_server() as server:
        yield server


def leftovers(folder: Path) -> list[str]:
    """Names in `folder`: a failed download must leave no temporary file behind."""
    return sorted(path.name for path in folder.iterdir())


# === gs:// ===


def test_gcs_download_verifies_and_caches(gcs: GcsEmulator, tmp_path: Path) -> None:
    gcs.client().create_bucket("weights").blob("coco/mask_rcnn.h5").upload_from_string(PAYLOAD)
    uri = "gs://weights/coco/mask_rcnn.h5"
    seen: list[tuple[int, int | None]] = []

    first = storage.download(uri, tmp_path / "out" / "w.h5", progress=lambda *a: seen.append(a))
    assert first == storage.DownloadResult(
        uri, tmp_path / "out" / "w.h5", len(PAYLOAD), PAYLOAD_SHA256, from_cache=False
    )
    assert (tmp_path / "out" / "w.h5").read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))  # progress reaches the blob's size

    # Same generation and size on the server: served from the cache, checked against its sha256.
    again = storage.download(uri, tmp_path / "again.h5", sha256=None)
    assert again.from_cache and again.sha256 == PAYLOAD_SHA256
    assert (tmp_path / "again.h5").read_bytes() == PAYLOAD


def test_gcs_download_with_expected_sha256(gcs: GcsEmulator, tmp_path: Path) -> None:
    gcs.client().create_bucket("b").blob("w.h5").upload_from_string(PAYLOAD)
    result = storage.download("gs://b/w.h5", tmp_path / "w.h5", sha256=PAYLOAD_SHA256.upper())
    assert result.sha256 == PAYLOAD_SHA256 and not result.from_cache

    with pytest.raises(StorageError, match=f"expected sha256 {'0' * 64}, got {PAYLOAD_SHA256}"):
        storage.download("gs://b/w.h5", tmp_path / "bad.h5", sha256="0" * 64)
    assert not (tmp_path / "bad.h5").exists()


def test_gcs_crc32c_mismatch_is_reported(gcs: GcsEmulator, tmp_path: Path) -> None:
    blob = gcs.client().create_bucket("b").blob("w.h5")
    blob.upload_from_string(PAYLOAD)
    # GCS refuses such a write; only the emulator's own metadata (a live dict) can lie like this.
    gcs.server._storage.get_file_obj("b", "w.h5")["crc32c"] = "AAAAAA=="

    # The client library checks crc32c on the whole response (and `_verify` again over every
    # byte, for resumed downloads): either way a one-line error, and nothing written.
    with pytest.raises(StorageError, match="checksum mismatch for gs://b/w.h5"):
        storage.download("gs://b/w.h5", tmp_path / "w.h5", **FAST)
    assert leftovers(tmp_path) == []


def test_a_gcs_download_cut_mid_file_resumes_where_it_stopped(
    gcs: GcsEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * (8 * 1024)  # 2 MiB
    gcs.client().create_bucket("b").blob("w.h5").upload_from_string(data)
    storage._client_for.cache_clear()  # the next client talks through the proxy
    with cutting_proxy(gcs.url, cut_after=1 << 20) as proxy:  # the link drops after 1 MiB
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        result = storage.download("gs://b/w.h5", tmp_path / "w.h5",
                                  sha256=hashlib.sha256(data).hexdigest(), **FAST)
    storage._client_for.cache_clear()
    assert proxy.cuts == 1
    assert (tmp_path / "w.h5").read_bytes() == data and result.bytes == len(data)
    # Resumed with a range request: about 2 MiB crossed the link (headers and metadata
    # aside), where starting over would have taken 3 MiB.
    assert len(data) <= proxy.served < len(data) + (256 << 10)
    assert not [name for name in leftovers(tmp_path) if name.startswith(".")]


def test_emulator_host_without_scheme(
    gcs: GcsEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gcs.client().create_bucket("b").blob("k").upload_from_string(b"data")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url.removeprefix("http://"))  # host:port
    assert storage.read_bytes("gs://b/k") == b"data"


def test_gcs_missing_object_and_bucket(gcs: GcsEmulator, tmp_path: Path) -> None:
    gcs.client().create_bucket("b")
    with pytest.raises(StorageError, match="^not found: gs://b/missing.h5$"):
        storage.download("gs://b/missing.h5", tmp_path / "w.h5", **FAST)
    with pytest.raises(StorageError, match="not found: gs://nobucket/x"):
        storage.read_bytes("gs://nobucket/x")
    assert not (tmp_path / "w.h5").exists()


def test_gcs_read_bytes_list_uris_and_upload(gcs: GcsEmulator, tmp_path: Path) -> None:
    bucket = gcs.client().create_bucket("data")
    for name in ["coco/annotations.json", "coco/images/2.jpg", "coco/images/1.jpg", "other/x"]:
        bucket.blob(name).upload_from_string(name.encode())

    assert storage.read_bytes("gs://data/coco/annotations.json") == b"coco/annotations.json"
    assert storage.list_uris("gs://data/coco/images/") == [
        "gs://data/coco/images/1.jpg",
        "gs://data/coco/images/2.jpg",
    ]
    assert len(storage.list_uris("gs://data/coco")) == 3  # a plain prefix, as GCS lists
    assert storage.list_uris("gs://data/nothing/") == []
    with pytest.raises(StorageError, match="^not found: gs://nobucket/$"):
        storage.list_uris("gs://nobucket/")

    (tmp_path / "report.json").write_bytes(b'{"ok": true}')
    assert storage.upload(tmp_path / "report.json", "gs://data/runs/report.json") == (
        "gs://data/runs/report.json"
    )
    assert bucket.blob("runs/report.json").download_as_bytes() == b'{"ok": true}'


# === http(s):// ===


def test_http_retries_503_then_succeeds(http: HttpServer, tmp_path: Path) -> None:
    url = http.add("/w.h5", PAYLOAD, fail_with=[503, 503])
    result = storage.download(url, tmp_path / "w.h5", sha256=PAYLOAD_SHA256, **FAST)
    assert http.count("/w.h5") == 3  # two 503s, then the body
    assert (tmp_path / "w.h5").read_bytes() == PAYLOAD
    assert result.bytes == len(PAYLOAD) and not result.from_cache


def test_http_gives_up_after_retries(http: HttpServer, tmp_path: Path) -> None:
    url = http.add("/w.h5", PAYLOAD, fail_with=[429, 500, 502])
    with pytest.raises(StorageError, match="HTTP 502 .* for http://.*/w.h5 .gave up after 3"):
        storage.download(url, tmp_path / "w.h5", retries=2, **FAST)
    assert http.count("/w.h5") == 3
    assert leftovers(tmp_path) == []


def test_http_truncated_body_is_retried_then_fails(http: HttpServer, tmp_path: Path) -> None:
    url = http.add("/w.h5", PAYLOAD[:1000], content_length=len(PAYLOAD))
    # urllib3 may drop the short chunk it was reading, so "got" is at most the 1000 bytes sent.
    reason = rf"^truncated body from {url}: got \d+ of 16384 bytes \(gave up after 3 attempts\)$"
    with pytest.raises(StorageError, match=reason):
        storage.download(url, tmp_path / "w.h5", retries=2, **FAST)
    assert http.count("/w.h5") == 3
    assert leftovers(tmp_path) == []


def test_http_404_is_not_retried(http: HttpServer, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="^HTTP 404 Not Found for http://.*/missing.h5$"):
        storage.download(http.url("/missing.h5"), tmp_path / "w.h5", **FAST)
    assert http.count("/missing.h5") == 1
    assert leftovers(tmp_path) == []


def test_unreachable_host(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.h5"
    with pytest.raises(UserError, match=f"cannot reach {url}: ConnectionError .gave up after 2"):
        storage.download(url, tmp_path / "w.h5", retries=1, **FAST)


def test_checksum_mismatch_keeps_existing_dest(http: HttpServer, tmp_path: Path) -> None:
    url = http.add("/w.h5", PAYLOAD)
    (tmp_path / "w.h5").write_bytes(b"previous weights")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(StorageError) as raised:
        storage.download(url, tmp_path / "w.h5", sha256=wrong, **FAST)
    assert str(raised.value) == (
        f"checksum mismatch for {url}: expected sha256 {wrong}, got {PAYLOAD_SHA256}"
    )
    assert http.count("/w.h5") == 1  # a wrong checksum is not retried
    assert (tmp_path / "w.h5").read_bytes() == b"previous weights"
    assert not [name for name in leftovers(tmp_path) if name.startswith(".")]


def test_http_cache_by_sha256_skips_the_server(http: HttpServer, tmp_path: Path) -> None:
    url = http.add("/w.h5", PAYLOAD)
    first = storage.download(url, tmp_path / "a.h5", sha256=PAYLOAD_SHA256)
    second = storage.download(url, tmp_path / "b.h5", sha256=PAYLOAD_SHA256)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert http.count("/w.h5") == 1
    assert (tmp_path / "b.h5").read_bytes() == PAYLOAD

    other_cache = storage.download(url, tmp_path / "c.h5", sha256=PAYLOAD_SHA256,
                                   cache_dir=tmp_path / "elsewhere")
    assert not other_cache.from_cache and http.count("/w.h5") == 2


def test_http_cache_by_etag_and_corrupt_entry(
    http: HttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    url = http.add("/w.h5", PAYLOAD, headers={"ETag": '"v1"'})
    assert not storage.download(url, tmp_path / "a.h5").from_cache
    assert storage.download(url, tmp_path / "b.h5").from_cache  # same ETag and size

    (entry,) = [path for path in cache_dir.rglob("*") if path.is_file()]
    entry.write_bytes(b"x" * len(PAYLOAD))  # a damaged cache is ignored, not served
    result = storage.download(url, tmp_path / "c.h5")
    assert not result.from_cache and (tmp_path / "c.h5").read_bytes() == PAYLOAD

    http.routes["/w.h5"].headers["ETag"] = '"v2"'  # a new version on the server
    assert not storage.download(url, tmp_path / "d.h5").from_cache
    assert http.count("/w.h5") == 4  # one request per download; no body read from the cache


# === local paths and file:// ===


def test_local_path_and_file_uri(tmp_path: Path, cache_dir: Path) -> None:
    source = tmp_path / "src" / "w.h5"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)

    plain = storage.download(str(source), tmp_path / "a.h5", sha256=PAYLOAD_SHA256)
    via_uri = storage.download(source.as_uri(), tmp_path / "b.h5")
    assert (plain.bytes, via_uri.sha256) == (len(PAYLOAD), PAYLOAD_SHA256)
    assert (tmp_path / "b.h5").read_bytes() == PAYLOAD
    assert not cache_dir.exists()  # local files are not copied into the cache

    with pytest.raises(StorageError, match="^not found: .*missing.h5$"):
        storage.download(tmp_path / "missing.h5", tmp_path / "c.h5")
    with pytest.raises(StorageError, match="unsupported URI s3://b/k"):
        storage.download("s3://b/k", tmp_path / "c.h5")


def test_local_read_list_and_upload(tmp_path: Path) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    for name in ["images/b.jpg", "images/a.jpg", "annotations.json"]:
        (tmp_path / "data" / name).write_bytes(name.encode())

    assert storage.read_bytes(str(tmp_path / "data" / "annotations.json")) == b"annotations.json"
    assert storage.read_bytes((tmp_path / "data" / "images" / "a.jpg").as_uri()) == b"images/a.jpg"
    assert storage.list_uris(str(tmp_path / "data" / "images")) == [
        str(tmp_path / "data" / "images" / "a.jpg"),
        str(tmp_path / "data" / "images" / "b.jpg"),
    ]
    assert storage.list_uris((tmp_path / "data" / "ann").as_uri()) == [
        (tmp_path / "data" / "annotations.json").as_uri()
    ]
    with pytest.raises(StorageError, match="cannot read .*nope.json"):
        storage.read_bytes(str(tmp_path / "nope.json"))

    dest = tmp_path / "out" / "copy.json"
    source = (tmp_path / "data" / "annotations.json").as_uri()
    assert storage.upload(source, str(dest)) == str(dest)
    assert dest.read_bytes() == b"annotations.json"
    assert leftovers(dest.parent) == ["copy.json"]


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("gs://b/k", True),
        ("https://example.com/w.h5", True),
        ("http://example.com/w.h5", True),
        ("file:///tmp/w.h5", False),
        ("/tmp/w.h5", False),
        ("relative/w.h5", False),
    ],
)
def test_is_remote(uri: str, remote: bool) -> None:
    assert storage.is_remote(uri) is remote
