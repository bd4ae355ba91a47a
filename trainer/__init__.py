"""Mask R-CNN (matterport-compatible) for TensorFlow 2 / Keras 3.

`from trainer import Config, MaskRCNN`. The names load lazily so that light entry points
(the CLI's help, KFP component bodies) don't pay for importing TensorFlow.

Importing the package turns on TensorFlow's oneDNN graph rewrite unless the environment says
otherwise (`TF_ENABLE_ONEDNN_OPTS=0` keeps it off). TensorFlow's x86 packages turn it on by
themselves only on CPUs with AVX-512 VNNI, BF16 or AMX; on AVX2-only CPUs (AMD EPYC among them)
its convolutions then run as Eigen's kernels, and the 256 px training step measured 1.6x slower
(README, "Speed"). TensorFlow reads the variable once, when it is first imported: a program
that imports TensorFlow before `trainer` sets it itself. It also keeps Keras's optional
scikit-learn, pandas and matplotlib integrations from loading (~150 MB of memory; see
`trainer.keras_extras`).
"""

import os

from trainer import keras_extras
from trainer.version import __version__ as __version__

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
keras_extras.install()


def __getattr__(name: str):
    if name == "Config":
        from trainer.config import Config

        return Config
    if name == "MaskRCNN":
        from trainer.engine.maskrcnn import MaskRCNN

        return MaskRCNN
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
