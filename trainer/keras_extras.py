"""Keeps Keras's optional integrations from importing scikit-learn, pandas and matplotlib.

`import tensorflow` loads Keras (its `tf.keras` alias), and Keras imports each of these if it is
installed: scikit-learn for its `keras.wrappers.SKLearn*` estimators, pandas to accept
DataFrames in `fit()`, matplotlib for `keras.visualization`. All three are installed beside
this package (MLflow depends on them), none of those Keras features is used here, and together
they cost a training process ~150 MB of resident memory (scikit-learn alone 149 MB, measured
with /proc/self/statm before and after the import) and ~1.5 s of start-up: 8 % of the 256 px
training step's peak RSS (README, "Speed").

`install()` puts a finder first on `sys.meta_path` that answers an import of one of these
packages *made by Keras or TensorFlow's own modules* with ModuleNotFoundError, which Keras
catches (every one of those imports is optional, in a try block). Everyone else gets the real
package: MLflow, the MLflow model's pandas, a user's `import sklearn` after this one. A package
already imported is not affected (the finder is not asked), so a program that imports Keras
before `trainer` keeps all of Keras's integrations; `MRCNN_KERAS_EXTRAS=1` keeps them too.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

KEPT_OUT = frozenset({"sklearn", "pandas", "matplotlib"})
IMPORTERS = ("keras", "tensorflow")


class KerasExtrasFinder(importlib.abc.MetaPathFinder):
    """Refuses the top-level packages in `KEPT_OUT` to importers under `IMPORTERS`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in KEPT_OUT:
            return None
        importer = _importing_module()
        if importer.partition(".")[0] in IMPORTERS:
            raise ModuleNotFoundError(
                f"{fullname} is kept out of {importer} by trainer.keras_extras "
                f"(MRCNN_KERAS_EXTRAS=1 lets it in)", name=fullname)
        return None


def _importing_module() -> str:
    """The name of the module whose code runs the import being looked up: the first frame
    outside importlib's own (frozen) machinery and this module."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_globals.get("__name__") == __name__):
        frame = frame.f_back
    return "" if frame is None else str(frame.f_globals.get("__name__", ""))


def install() -> bool:
    """Puts `KerasExtrasFinder` first on sys.meta_path, once; False when
    MRCNN_KERAS_EXTRAS=1 asks to keep Keras's integrations."""
    if os.environ.get("MRCNN_KERAS_EXTRAS") == "1":
        return False
    if not any(isinstance(finder, KerasExtrasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, KerasExtrasFinder())
    return True
