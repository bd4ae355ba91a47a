"""Importing `trainer` keeps Keras's optional scikit-learn, pandas and matplotlib integrations
from loading (trainer.keras_extras), without hiding those packages from anyone else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer import keras_extras

# In a fresh interpreter: which of the packages TensorFlow + Keras loaded, then whether the
# program itself can still import them and whether Keras saw scikit-learn.
PROGRAM = """
import json, sys
import trainer
import tensorflow, keras
loaded = sorted(name for name in ("sklearn", "pandas", "matplotlib") if name in sys.modules)
import pandas, sklearn, matplotlib
from keras.src.wrappers import fixes
print(json.dumps({"loaded": loaded, "own_import": [pandas.__name__, sklearn.__name__,
                  matplotlib.__name__], "keras_sklearn": fixes.sklearn is not None}))
"""


def _run(extras: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MRCNN_KERAS_EXTRAS"}
    if extras is not None:
        env["MRCNN_KERAS_EXTRAS"] = extras
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_keras_loads_none_of_the_extras_and_the_program_still_can():
    report = _run(None)
    assert report["loaded"] == []
    assert report["own_import"] == ["pandas", "sklearn", "matplotlib"]
    assert report["keras_sklearn"] is False


def test_the_environment_variable_keeps_kerass_integrations():
    report = _run("1")
    assert report["loaded"] == ["matplotlib", "pandas", "sklearn"]
    assert report["keras_sklearn"] is True


@pytest.mark.parametrize(("importer", "refused"), [
    ("keras.src.wrappers.fixes", True), ("tensorflow.python.keras", True), ("keras", True),
    ("mlflow.models", False), ("kerastuner", False), ("__main__", False)])
def test_the_finder_refuses_only_keras_and_tensorflow(importer, refused, monkeypatch):
    # The import statement runs as code of `importer`; the package is made absent from
    # sys.modules so the finders are asked.
    monkeypatch.delitem(sys.modules, "pandas", raising=False)
    finder = keras_extras.KerasExtrasFinder()
    monkeypatch.setattr(sys, "meta_path", [finder])  # nobody else can find it
    namespace = {"__name__": importer}
    expected = "kept out of" if refused else "No module named"
    with pytest.raises(ModuleNotFoundError, match=expected):
        exec("import pandas", namespace)


def test_the_finder_ignores_other_packages_and_installs_once(monkeypatch):
    finder = keras_extras.KerasExtrasFinder()
    assert finder.find_spec("numpy") is None
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delenv("MRCNN_KERAS_EXTRAS", raising=False)
    assert keras_extras.install() is True
    assert keras_extras.install() is True
    assert sum(isinstance(f, keras_extras.KerasExtrasFinder) for f in sys.meta_path) == 1
    assert isinstance(sys.meta_path[0], keras_extras.KerasExtrasFinder)
    monkeypatch.setenv("MRCNN_KERAS_EXTRAS", "1")
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if not isinstance(f, keras_extras.KerasExtrasFinder)])
    assert keras_extras.install() is False
    assert not any(isinstance(f, keras_extras.KerasExtrasFinder) for f in sys.meta_path)
