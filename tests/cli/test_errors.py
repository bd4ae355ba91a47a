"""Every `mrcnn` subcommand against its typical failures: exit 2, one line on stderr that
names the command and says what is wrong, no traceback, nothing written where it failed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import submit
from tests.servers import HttpServer, http_server
from trainer.cli.main import main

DEMO = "configs/demo.yaml"


@pytest.fixture(scope="module")
def http():
    with http_server() as server:
        yield server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hostile_h5(path: Path) -> Path:
    """A Keras-2 layout whose conv1 kernel is an external link into another file."""
    with h5py.File(path.with_name("other.h5"), "w") as other:
        other["data"] = np.zeros((3, 3), np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv1"], dtype="S")
        group = f.create_group("conv1")
        group.attrs["weight_names"] = np.array([b"conv1/kernel:0"], dtype="S")
        group["conv1/kernel:0"] = h5py.ExternalLink(str(path.with_name("other.h5")), "/data")
    return path


def not_utf8_h5(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv\xff1"], dtype="S")
    return path


def cases(tmp: Path, http: HttpServer) -> dict[str, tuple[list[str], str]]:
    """{case: (argv, what the error line must say)}."""
    down = f"http://127.0.0.1:{closed_port()}"
    (tmp / "a_file").write_text("mine")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return {
        "run/bad-param": (["run", "--param", "total_epochs=abc"], "total_epochs"),
        "run/missing-config": (["run", "--config", str(tmp / "no.yaml")], "does not exist"),
        "fetch/no-host": (["weights", "fetch", "https://", "--out", str(tmp / "w.h5")],
                          "no host"),
        "fetch/bad-ipv6": (["weights", "fetch", "http://[::1/w.h5", "--out", str(tmp / "w.h5")],
                           "malformed URI"),
        "fetch/bad-port": (["weights", "fetch", "http://h:99999/w", "--out", str(tmp / "w.h5")],
                           "malformed URI"),
        "fetch/external-link": (["weights", "fetch", str(hostile_h5(tmp / "hostile.h5")),
                                 "--out", str(tmp / "w.h5"), "--config", DEMO],
                                "is an external link"),
        "inspect/not-utf8": (["weights", "inspect", str(not_utf8_h5(tmp / "latin1.h5")),
                              "--config", DEMO], "not UTF-8"),
        "inspect/missing": (["weights", "inspect", str(tmp / "nope.h5"), "--config", DEMO],
                            "does not exist"),
        "prepare/user-folder": (["data", "prepare", "--out", str(tmp / "mine")],
                                "not written by `mrcnn data prepare`"),
        "prepare/unwritable": (["data", "prepare", "--out", "/proc/no/such/dir", "--count", "1"],
                               "/proc/no"),
        "prepare/coco-missing": (["data", "prepare", "--source", "coco", "--out",
                                  str(tmp / "d"), "--annotations", str(tmp / "no.json"),
                                  "--images", str(tmp)], "cannot read"),
        "train/not-a-dataset": (["train", "--config", DEMO, "--data", str(tmp), "--epochs",
                                 "1"], "not a prepared dataset"),
        "train/keep-last": (["train", "--config", DEMO, "--data", str(tmp), "--epochs", "1",
                             "--keep-last", "0"], "keep_last must be at least 1"),
        "evaluate/not-a-dataset": (["evaluate", "--config", DEMO, "--weights", "last",
                                    "--data", str(tmp), "--out", str(tmp / "ev")],
                                   "prepared dataset"),
        "compile/unwritable": (["pipeline", "compile", "--out", str(tmp / "a_file" / "p.yaml")],
                               "a_file"),
        "submit/unreachable": (["pipeline", "submit", "--host", down], "failed 2 times"),
        "submit/malformed-host": (["pipeline", "submit", "--host", "http://[::1"], "malformed"),
        "submit/forbidden": (["pipeline", "submit", "--host", http.url("/forbidden")],
                             "refused to connect (HTTP 403"),
        "submit/failing": (["pipeline", "submit", "--host", http.url("/failing")],
                           "HTTP 500"),
        "schedule/bad-cron": (["pipeline", "schedule", "--host", down, "--cron", "0 3"],
                              "expected 5 fields"),
        "schedule/unreachable": (["pipeline", "schedule", "--host", down, "--cron",
                                  "0 3 * * 0"], "failed 2 times"),
    }


CASES = ["run/bad-param", "run/missing-config", "fetch/no-host", "fetch/bad-ipv6",
         "fetch/bad-port", "fetch/external-link", "inspect/not-utf8", "inspect/missing",
         "prepare/user-folder", "prepare/unwritable", "prepare/coco-missing",
         "train/not-a-dataset", "train/keep-last", "evaluate/not-a-dataset",
         "compile/unwritable", "submit/unreachable", "submit/malformed-host",
         "submit/forbidden", "submit/failing", "schedule/bad-cron", "schedule/unreachable"]


def files(folder: Path) -> list[str]:
    """What is under `folder`, but a failed fetch's report (written on purpose)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not p.name.endswith(".report.json"))


@pytest.mark.parametrize("case", CASES)
def test_every_subcommand_fails_in_one_line(case, tmp_path, http, capsys, monkeypatch):
    monkeypatch.setattr(submit, "API_ATTEMPTS", 2)
    monkeypatch.setattr(submit, "API_RETRY_SECONDS", 0.01)
    healthz = "/apis/v2beta1/healthz"
    http.add("/forbidden" + healthz, b"", fail_with=[403] * 5)
    http.add("/failing" + healthz, b"", fail_with=[500] * 5)
    argv, message = cases(tmp_path, http)[case]
    before = files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("mrcnn ")]
    command = "mrcnn " + " ".join(a for a in argv[:2] if not a.startswith("-"))
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), captured.err
    assert captured.err.endswith(lines[0] + "\n")  # the last word; progress lines before it
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert files(tmp_path) == before  # nothing half-written left behind
    if case == "submit/forbidden":
        assert http.count("/forbidden" + healthz) == 1  # 401/403: never retried
    if case == "submit/failing":
        assert http.count("/failing" + healthz) == 2  # bounded


def test_the_real_process_exits_2_with_one_line():
    """The console script itself (not only main()): exit status and stderr as users see it."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli.main", "pipeline", "submit", "--host",
         f"http://127.0.0.1:{closed_port()}", "--param", "bogus=1"],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrcnn ")]
    assert len(errors) == 1 and "bogus" in errors[0] and "Traceback" not in result.stderr
