"""The architecture is a contract the build checks: `make lint` runs import-linter with the
contracts in pyproject.toml. Here a copy of the tree with one contract deliberately broken must
fail it, and the untouched copy must pass (so the check really reads the copy)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_copy(tmp_path: Path, breakage: tuple[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    for package in ("trainer", "components", "pipeline"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if breakage is not None:
        module, line = breakage
        path = tmp_path / module
        path.write_text(line + "\n" + path.read_text())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_contracts(tmp_path):
    result = lint_copy(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("trainer/model/anchors.py", "import kfp  # noqa", "trainer never imports kfp"),
    ("trainer/model/anchors.py", "from trainer.data import shapes  # noqa",
     "the model is the Keras graph only"),
    ("trainer/weights/checkpoints.py", "from trainer.engine import strategy  # noqa",
     "trainer layers"),
    ("pipeline/pipeline.py", "from trainer.engine import maskrcnn  # noqa",
     "pipeline wires components"),
])
def test_a_broken_contract_fails_the_lint(tmp_path, module, line, contract):
    result = lint_copy(tmp_path, (module, line))
    assert result.returncode != 0
    # the contract is named in the report's "Broken contracts" part, not only in its list
    assert "Broken contracts" in result.stdout, result.stdout[-3000:]
    assert contract in result.stdout.split("Broken contracts", 1)[1], result.stdout[-3000:]
