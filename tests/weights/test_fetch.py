"""fetch-weights: download from gs:// (emulator), http:// (scripted server) or a path, then
check the file against the configured model before anything trains.

Weights files are written here with plain h5py in matterport's Keras 2 layout (root attributes
layer_names/backend/keras_version, a group per layer, `rpn_model` holding its sub-layers'
weights under their own names, TimeDistributed weights named after the wrapper), independently
of `trainer.weights.h5layout`'s writer. Most tests use the demo config (resnet50, 4 classes) and
datasets that HDF5 never allocates (a few KB on disk, shapes intact); one module-scoped file
has every array of matterport's resnet101 / 81-class COCO model, as zeros (~256 MB).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from tests.servers import GcsEmulator, HttpServer, http_server
from trainer.cli import main as cli
from trainer.config import Config
from trainer.errors import StorageError, UserError, WeightsFileError
from trainer.model.mask_rcnn import build_inference_model
from trainer.weights.by_name import CLASS_SPECIFIC_LAYERS, WeightsMismatchError
from trainer.weights.fetch import (
    ArchitectureMismatchError,
    UnsupportedSourceError,
    fetch_weights,
    report_path_for,
)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# The demo at 128 px with matterport's architecture (the layout its h5 files have): the demo's
# own from-scratch recipe uses a ResNet-18 and GroupNorm, which no released file fits.
MATTERPORT_DEMO = ["BACKBONE=resnet50", "NORM=batch", "TOP_DOWN_PYRAMID_SIZE=256",
                   "FPN_CLASSIF_FC_LAYERS_SIZE=1024"]
MATTERPORT_SET = [arg for key in MATTERPORT_DEMO for arg in ("--set", key)]
FAST = {"backoff_seconds": 0.001}  # retries still happen, without the production pauses

Layers = dict[str, list[tuple[str, tuple[int, ...]]]]  # layer -> [(weight name, shape)]


# === Matterport-layout files, written with h5py ===


def matterport_layers(keras_model: keras.Model) -> Layers:
    """Every top-level layer of `keras_model` with its weights named as Keras 2 named them."""
    layers: Layers = {}
    for layer in keras_model.layers:
        if isinstance(layer, keras.Model):  # rpn_model: b"rpn_conv_shared/kernel:0", ...
            owned = [(sub.name, v) for sub in layer.layers for v in sub.weights]
        else:  # a TimeDistributed wrapper lends its name: b"mrcnn_class_conv1/kernel:0"
            owned = [(layer.name, v) for v in layer.weights]
        layers[layer.name] = [(f"{owner}/{v.name}:0", tuple(int(d) for d in v.shape))
                              for owner, v in owned]
    return layers


def write_matterport_h5(path: Path, layers: Layers, *, allocate: bool) -> Path:
    """allocate=True stores zeros; False leaves datasets unallocated (shapes only, tiny file)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name in layers], dtype="S")
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer, weights in layers.items():
            group = f.create_group(layer)
            names = [name.encode() for name, _ in weights]
            group.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array(
                [], dtype="S1")
            for name, shape in weights:
                if allocate:
                    group.create_dataset(name, data=np.zeros(shape, dtype="float32"))
                else:
                    group.create_dataset(name, shape=shape, dtype="float32")
    return path


def weighted(layers: Layers) -> list[str]:
    return [name for name, weights in layers.items() if weights]


@pytest.fixture(scope="module")
def demo_config() -> Config:
    return Config.from_yaml(DEMO_CONFIG, MATTERPORT_DEMO)


@pytest.fixture(scope="module")
def demo_layers(demo_config: Config) -> Layers:
    return matterport_layers(build_inference_model(demo_config))


@pytest.fixture(scope="module")
def demo_h5(demo_layers: Layers, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A valid weights file for the demo config, as bytes (a few KB)."""
    path = tmp_path_factory.mktemp("demo") / "demo.h5"
    return write_matterport_h5(path, demo_layers, allocate=False).read_bytes()


@pytest.fixture(scope="module")
def coco_layers() -> Layers:
    return matterport_layers(build_inference_model(Config(BACKBONE="resnet101",
                                                          NUM_CLASSES=81)))


@pytest.fixture(scope="module")
def coco_h5(coco_layers: Layers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """matterport's mask_rcnn_coco.h5 layout, every array present (zeros)."""
    path = tmp_path_factory.mktemp("coco") / "mask_rcnn_coco.h5"
    yield write_matterport_h5(path, coco_layers, allocate=True)
    path.unlink()  # ~256 MB: do not keep it among pytest's retained temp folders


# === Servers and environment ===

_MODELS: dict[str, keras.Model] = {}


@pytest.fixture(autouse=True)
def build_each_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch builds the configured model on every call (1-3 s); here each config's model is
    built once by the real builder and reused: the layers are the same every time."""
    from trainer.model import mask_rcnn

    def build_once(config: Config) -> keras.Model:
        key = config.to_yaml()
        if key not in _MODELS:
            _MODELS[key] = build_inference_model(config)
        return _MODELS[key]

    monkeypatch.setattr(mask_rcnn, "build_inference_model", build_once)


@pytest.fixture
def http() -> Iterator[HttpServer]:
    with http_server() as server:
        yield server


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out" / "weights.h5"


def assert_nothing_at(out: Path) -> dict:
    """After a failure: no weights file and no temporary file, only the failure report."""
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["weights.h5.report.json"]
    report = json.loads(report_path_for(out).read_text())
    assert report["ok"] is False and report["error"]
    return report


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# === Sources that work ===


def test_gcs_source(gcs: GcsEmulator, demo_h5: bytes, demo_config: Config, demo_layers: Layers,
                    out: Path) -> None:
    gcs.client().create_bucket("models").blob("w/demo.h5").upload_from_string(demo_h5)
    report = fetch_weights("gs://models/w/demo.h5", out, config=demo_config,
                           sha256=hashlib.sha256(demo_h5).hexdigest())
    assert out.read_bytes() == demo_h5
    n_layers = len(weighted(demo_layers))
    assert report["ok"] is True and report["error"] is None
    assert report["initialisation"] == "pretrained"
    assert (report["bytes"], report["sha256"]) == (len(demo_h5),
                                                   hashlib.sha256(demo_h5).hexdigest())
    assert (report["keras_version"], report["backend"]) == ("2.2.4", "tensorflow")
    assert report["counts"] == {"model_layers": n_layers, "file_layers": n_layers,
                                "shared": n_layers, "matched": n_layers, "missing": 0, "unused": 0,
                                "mismatched": 0, "excluded": 0}
    assert report["matched"] == sorted(weighted(demo_layers))
    assert json.loads(report_path_for(out).read_text()) == report
    assert sorted(p.name for p in out.parent.iterdir()) == ["weights.h5",
                                                            "weights.h5.report.json"]


def test_http_source_retried_after_two_failures(http: HttpServer, demo_h5: bytes,
                                                demo_config: Config, out: Path) -> None:
    url = http.add("/mask_rcnn_demo.h5", demo_h5, fail_with=[503, 502],
                   headers={"ETag": '"v1"'})
    report = fetch_weights(url, out, config=demo_config, **FAST)
    assert http.count("/mask_rcnn_demo.h5") == 3
    assert report["ok"] and out.read_bytes() == demo_h5
    # A second fetch is served by the cache: one more request (the version check), no body
    again = fetch_weights(url, out, config=demo_config, **FAST)
    assert again["from_cache"] is True and again["sha256"] == report["sha256"]


def test_local_path_and_file_uri(tmp_path: Path, demo_h5: bytes, demo_config: Config,
                                 out: Path) -> None:
    source = tmp_path / "local.h5"
    source.write_bytes(demo_h5)
    assert fetch_weights(str(source), out, config=demo_config)["ok"]
    assert out.read_bytes() == demo_h5
    out.unlink()
    assert fetch_weights(source.as_uri(), out, config=demo_config)["ok"]
    assert out.exists()


def test_a_fetch_without_sha256_is_not_verified_and_says_so(
        tmp_path: Path, demo_h5: bytes, demo_config: Config, out: Path) -> None:
    source = tmp_path / "local.h5"
    source.write_bytes(demo_h5)
    digest = hashlib.sha256(demo_h5).hexdigest()
    [warning] = fetch_weights(str(source), out, config=demo_config)["warnings"]
    assert warning.startswith("no sha256 given: the file was not verified")
    assert digest in warning and "WEIGHTS_SHA256" in warning
    assert fetch_weights(str(source), out, config=demo_config, sha256=digest)["warnings"] == []


def test_none_source_is_random_initialisation(demo_config: Config, out: Path) -> None:
    out.parent.mkdir()
    out.write_bytes(b"the user's own weights")
    (out.parent / "report.json").write_text("the user's unrelated report")
    report = fetch_weights("none", out, config=demo_config)
    assert report["source"] == "none" and report["initialisation"] == "random"
    assert report["ok"] is True and report["out"] is None
    assert report["warnings"] == []  # demo.yaml sets TRAIN_BN: true
    # nothing the user had is touched: random initialisation writes no weights
    assert out.read_bytes() == b"the user's own weights"
    assert (out.parent / "report.json").read_text() == "the user's unrelated report"
    assert json.loads(report_path_for(out).read_text()) == report
    # matterport's default TRAIN_BN=false freezes BatchNorm at its initial statistics
    assert "TRAIN_BN" in fetch_weights("none", out, config=Config())["warnings"][0]


# === Failures: a reason each, and nothing at `out` ===


def test_unreachable_source(out: Path, demo_config: Config) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StorageError, match=r"cannot reach .* \(gave up after 3 attempts\)"):
        fetch_weights(f"http://127.0.0.1:{port}/w.h5", out, config=demo_config, retries=2,
                      **FAST)
    assert_nothing_at(out)


def test_http_error_is_not_retried(http: HttpServer, out: Path, demo_config: Config) -> None:
    with pytest.raises(StorageError, match=r"HTTP 404 .*/missing\.h5"):
        fetch_weights(http.url("/missing.h5"), out, config=demo_config, **FAST)
    assert http.count("/missing.h5") == 1
    assert_nothing_at(out)


def test_body_cut_short(http: HttpServer, demo_h5: bytes, out: Path,
                        demo_config: Config) -> None:
    url = http.add("/cut.h5", demo_h5[:1000], content_length=len(demo_h5))
    with pytest.raises(StorageError, match=rf"truncated body .* got \d+ of {len(demo_h5)}"):
        fetch_weights(url, out, config=demo_config, retries=1, **FAST)
    assert http.count("/cut.h5") == 2
    assert_nothing_at(out)


def test_checksum_mismatch(gcs: GcsEmulator, demo_h5: bytes, out: Path,
                           demo_config: Config) -> None:
    gcs.client().create_bucket("models").blob("demo.h5").upload_from_string(demo_h5)
    with pytest.raises(StorageError, match="checksum mismatch .* expected sha256 0{64}"):
        fetch_weights("gs://models/demo.h5", out, config=demo_config, sha256="0" * 64)
    assert_nothing_at(out)


def test_truncated_file(tmp_path: Path, demo_h5: bytes, out: Path, demo_config: Config) -> None:
    source = tmp_path / "truncated.h5"
    source.write_bytes(demo_h5[: len(demo_h5) // 2])  # the server said nothing of its size
    with pytest.raises(WeightsFileError, match="truncated or corrupt HDF5") as caught:
        fetch_weights(str(source), out, config=demo_config)
    assert str(source) in str(caught.value) and ".fetching" not in str(caught.value)
    assert_nothing_at(out)


def test_not_hdf5(http: HttpServer, out: Path, demo_config: Config) -> None:
    url = http.add("/login.html", b"<html>Sign in to continue</html>")  # a 200 that is a page
    with pytest.raises(WeightsFileError, match="is not an HDF5 file") as caught:
        fetch_weights(url, out, config=demo_config)
    assert str(caught.value).startswith(url)
    assert_nothing_at(out)


def test_hdf5_without_keras_layout(tmp_path: Path, out: Path, demo_config: Config) -> None:
    source = tmp_path / "data.h5"
    with h5py.File(source, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4)))
    with pytest.raises(WeightsFileError, match="without the Keras weights layout"):
        fetch_weights(str(source), out, config=demo_config)
    assert_nothing_at(out)


def test_shape_mismatch_names_layers_and_the_exclude_that_fixes_it(
        tmp_path: Path, demo_layers: Layers, out: Path, demo_config: Config) -> None:
    source = write_matterport_h5(tmp_path / "demo.h5", demo_layers, allocate=False)
    wider = demo_config.replace(FPN_CLASSIF_FC_LAYERS_SIZE=512)  # class head 1024 -> 512 wide
    with pytest.raises(WeightsMismatchError) as caught:
        fetch_weights(str(source), out, config=wider, exclude=["mrcnn_mask"])
    message = str(caught.value)
    # mrcnn_class_conv1/conv2, bn1/bn2, logits and bbox_fc all depend on the width
    assert "mrcnn_class_conv1 (mrcnn_class_conv1/kernel:0: file (7, 7, 256, 1024) vs model " \
           "(7, 7, 256, 512))" in message
    assert "exclude=['mrcnn_bbox_fc', 'mrcnn_class_bn1', 'mrcnn_class_bn2', " \
           "'mrcnn_class_conv1', 'mrcnn_class_conv2', 'mrcnn_class_logits', 'mrcnn_mask']" \
           in message
    assert "\n" not in message
    report = assert_nothing_at(out)
    assert report["counts"]["mismatched"] == 6 and report["error"] == message
    # ...and with that list excluded the file fits
    fixed = ["mrcnn_bbox_fc", "mrcnn_class_bn1", "mrcnn_class_bn2", "mrcnn_class_conv1",
             "mrcnn_class_conv2", "mrcnn_class_logits", "mrcnn_mask"]
    assert fetch_weights(str(source), out, config=wider, exclude=fixed)["ok"]


def test_file_for_another_architecture(tmp_path: Path, out: Path, demo_config: Config,
                                       demo_layers: Layers) -> None:
    source = write_matterport_h5(tmp_path / "vgg.h5", {
        "block1_conv1": [("block1_conv1/kernel:0", (3, 3, 3, 64)),
                         ("block1_conv1/bias:0", (64,))],
        "conv1": [("conv1/kernel:0", (7, 7, 3, 64)), ("conv1/bias:0", (64,))],
        "fc1": [("fc1/kernel:0", (25088, 4096)), ("fc1/bias:0", (4096,))],
    }, allocate=False)
    total = len(weighted(demo_layers))  # resnet50: 2 + 16 x 6 + 4 x 2, 8 fpn, rpn, 16 heads
    assert total == 131
    with pytest.raises(ArchitectureMismatchError,
                       match=rf"only 1 of its {total} layers.*at least {(total + 1) // 2} "
                             r"needed.* such as block1_conv1, fc1"):
        fetch_weights(str(source), out, config=demo_config)
    assert_nothing_at(out)


def test_matched_fraction_threshold(tmp_path: Path, demo_layers: Layers, out: Path,
                                    demo_config: Config) -> None:
    heads = {name: w for name, w in demo_layers.items() if not re.match(r"(res|bn|conv1)", name)}
    source = write_matterport_h5(tmp_path / "heads.h5", heads, allocate=False)
    model_layers = len(weighted(demo_layers))
    share = len(weighted(heads)) / model_layers  # fpn_*, rpn_model, mrcnn_*: 25 of 131
    report = fetch_weights(str(source), out, config=demo_config, min_matched_fraction=share)
    assert report["ok"] and report["counts"]["missing"] == model_layers - len(weighted(heads))
    before = out.read_bytes()
    with pytest.raises(ArchitectureMismatchError, match="is not weights for this model"):
        fetch_weights(str(source), out, config=demo_config, min_matched_fraction=share + 0.01)
    assert out.read_bytes() == before  # the earlier good fetch stays
    assert json.loads(report_path_for(out).read_text())["ok"] is False


def test_excluding_too_much_fails(tmp_path: Path, demo_layers: Layers, out: Path,
                                  demo_config: Config) -> None:
    source = write_matterport_h5(tmp_path / "demo.h5", demo_layers, allocate=False)
    backbone = [name for name in weighted(demo_layers) if re.match(r"(res|bn)", name)]
    with pytest.raises(ArchitectureMismatchError,
                       match=rf"only {131 - len(backbone)} of the model's 131 .* exclude fewer"):
        fetch_weights(str(source), out, config=demo_config, exclude=backbone)
    assert_nothing_at(out)


def test_bad_arguments_touch_nothing(out: Path, demo_config: Config) -> None:
    with pytest.raises(UnsupportedSourceError, match="not supported: nothing is downloaded"):
        fetch_weights("imagenet", out, config=demo_config)
    with pytest.raises(UserError, match="64 hexadecimal digits"):
        fetch_weights("gs://b/w.h5", out, config=demo_config, sha256="abc")
    assert not out.parent.exists()


def test_validation_failure_keeps_a_local_source_that_is_out(
        tmp_path: Path, demo_h5: bytes, demo_config: Config) -> None:
    source = tmp_path / "weights.h5"
    source.write_bytes(demo_h5)
    with pytest.raises(WeightsMismatchError):
        fetch_weights(str(source), source, config=demo_config.replace(NUM_CLASSES=3))
    assert source.read_bytes() == demo_h5


# === matterport's COCO layout: resnet101, 81 classes ===


def test_coco_file_fits_a_4_class_resnet101_with_class_layers_excluded(
        coco_h5: Path, coco_layers: Layers, out: Path) -> None:
    config = Config.from_yaml(DEMO_CONFIG, [*MATTERPORT_DEMO, "BACKBONE=resnet101"])
    # conv1 + bn_conv1, 33 bottlenecks x 6 + 4 shortcuts x 2, 8 fpn, rpn_model, 6 + 10 heads
    assert len(weighted(coco_layers)) == 2 + 33 * 6 + 4 * 2 + 8 + 1 + 6 + 10 == 233
    with pytest.raises(WeightsMismatchError) as caught:
        fetch_weights(str(coco_h5), out, config=config)
    message = str(caught.value)
    for layer in ("mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask"):
        assert f"{layer} ({layer}/" in message
    assert f"exclude={sorted(CLASS_SPECIFIC_LAYERS)}" in message
    assert_nothing_at(out)

    report = fetch_weights(str(coco_h5), out, config=config, exclude=CLASS_SPECIFIC_LAYERS)
    class_weighted = [name for name in CLASS_SPECIFIC_LAYERS if coco_layers[name]]
    assert report["ok"] and report["counts"] == {
        "model_layers": 233, "file_layers": 233, "shared": 233,
        "matched": 233 - len(class_weighted),
        "missing": 0, "unused": 0, "mismatched": 0, "excluded": len(CLASS_SPECIFIC_LAYERS)}
    assert report["bytes"] == coco_h5.stat().st_size > 250e6
    out.unlink()


def test_cli_inspect_coco_file(coco_h5: Path, coco_layers: Layers,
                               capsys: pytest.CaptureFixture) -> None:
    argv = ["weights", "inspect", str(coco_h5), "--config", str(DEMO_CONFIG), *MATTERPORT_SET,
            "--set", "BACKBONE=resnet101"]
    code, stdout, _ = run_cli(argv + ["--exclude", *CLASS_SPECIFIC_LAYERS], capsys)
    expected_matched = len(weighted(coco_layers)) - sum(
        1 for name in CLASS_SPECIFIC_LAYERS if coco_layers[name])  # 233 - 3
    assert code == 0
    assert re.search(rf"^matched\s+{expected_matched}\s", stdout, re.M)
    assert re.search(rf"^excluded\s+{len(CLASS_SPECIFIC_LAYERS)}\s", stdout, re.M)
    assert "status         OK" in stdout

    code, stdout, stderr = run_cli(argv + ["--json"], capsys)
    assert code == 2
    report = json.loads(stdout)
    assert report["ok"] is False
    assert report["mismatched_layers"] == ["mrcnn_bbox_fc", "mrcnn_class_logits", "mrcnn_mask"]
    assert stderr.startswith("mrcnn weights inspect: error: ") and stderr.count("\n") == 1
    assert "mrcnn_class_logits" in stderr and "exclude=" in stderr


# === CLI: fetch ===


def test_cli_fetch_prints_progress_and_json(http: HttpServer, demo_h5: bytes, out: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    url = http.add("/w.h5", demo_h5)
    argv = ["weights", "fetch", url, "--out", str(out), "--config", str(DEMO_CONFIG),
            *MATTERPORT_SET, "--sha256", hashlib.sha256(demo_h5).hexdigest(), "--json"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0
    assert json.loads(stdout)["ok"] is True and out.read_bytes() == demo_h5
    assert f"downloading {url}: " in stderr and "(100%)" in stderr

    code, stdout, _ = run_cli(["weights", "fetch", "none", "--out", str(out)], capsys)
    assert code == 0 and "random initialisation" in stdout
    assert out.read_bytes() == demo_h5  # the earlier fetch's weights stay


@pytest.mark.parametrize("case", ["unreachable", "http_error", "cut_short", "checksum",
                                  "not_hdf5", "truncated", "no_layout", "mismatch",
                                  "architecture", "imagenet", "bad_set"])
def test_cli_fetch_failures(case: str, http: HttpServer, demo_h5: bytes, out: Path,
                            tmp_path: Path, capsys: pytest.CaptureFixture,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.io import storage

    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.001)
    good = http.add("/w.h5", demo_h5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(demo_h5[: len(demo_h5) // 3])
    foreign = write_matterport_h5(tmp_path / "foreign.h5", {"dense": [("dense/kernel:0", (4, 2))]},
                                  allocate=False)
    no_layout = tmp_path / "plain.h5"
    with h5py.File(no_layout, "w") as f:
        f["x"] = np.zeros(3)
    source, extra, reason = {
        "unreachable": (f"http://127.0.0.1:{closed_port}/w.h5", [], "cannot reach"),
        "http_error": (http.url("/gone.h5"), [], "HTTP 404"),
        "cut_short": (http.add("/cut.h5", demo_h5[:100], content_length=len(demo_h5)), [],
                      "truncated body"),
        "checksum": (good, ["--sha256", "1" * 64], "checksum mismatch"),
        "not_hdf5": (http.add("/page", b"<html></html>"), [], "is not an HDF5 file"),
        "truncated": (str(truncated), [], "truncated or corrupt HDF5 file"),
        "no_layout": (str(no_layout), [], "without the Keras weights layout"),
        "mismatch": (good, ["--set", "NUM_CLASSES=3"], "exclude=['mrcnn_bbox'"),
        "architecture": (str(foreign), [], "is not weights for this model"),
        "imagenet": ("imagenet", [], "not supported"),
        "bad_set": (good, ["--set", "NUM_CLASES=3"], "NUM_CLASES"),
    }[case]
    argv = ["weights", "fetch", source, "--out", str(out), "--config", str(DEMO_CONFIG),
            *MATTERPORT_SET]
    code, stdout, stderr = run_cli(argv + extra, capsys)
    assert code == 2 and stdout == ""
    error_lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("mrcnn weights fetch: error: ")
    assert reason in error_lines[0]
    assert not out.exists()
    leftovers = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers in ([], ["weights.h5.report.json"])


def test_cli_inspect_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["weights", "inspect", str(tmp_path / "nope.h5"), "--config", str(DEMO_CONFIG)]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2 and stdout == ""
    assert stderr == f"mrcnn weights inspect: error: weights file {tmp_path / 'nope.h5'} " \
                     "does not exist (or is not a file)\n"


@pytest.mark.parametrize("case", ["sha256", "unreachable", "mismatch"])
def test_a_failed_fetch_leaves_the_users_file_and_reports_where_asked(
        case: str, tmp_path: Path, demo_h5: bytes, demo_config: Config, http: HttpServer,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "weights.h5"
    out.write_bytes(b"the user's weights from last week")
    source = tmp_path / "new.h5"
    source.write_bytes(demo_h5)
    argv, reason = {
        "sha256": ([str(source), "--sha256", "0" * 64], "sha256"),
        "unreachable": (["http://127.0.0.1:9/w.h5"], "127.0.0.1"),
        "mismatch": ([str(source), "--set", "NUM_CLASSES=3"], "exclude="),
    }[case]
    report = tmp_path / "logs" / "fetch.json"
    code, _, stderr = run_cli(["weights", "fetch", *argv, "--out", str(out), "--config",
                               str(DEMO_CONFIG), "--report", str(report)], capsys)
    assert code == 2 and reason in stderr
    assert out.read_bytes() == b"the user's weights from last week"
    assert json.loads(report.read_text())["ok"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "new.h5", "weights.h5"]
