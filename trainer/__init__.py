"""Mask R-CNN (matterport-compatible) for TensorFlow 2 / Keras 3.

`from trainer import Config, MaskRCNN`. The names load lazily so that light entry points
(the CLI's help, KFP component bodies) don't pay for importing TensorFlow.
"""

from trainer.version import __version__ as __version__


def __getattr__(name: str):
    if name == "Config":
        from trainer.config import Config

        return Config
    if name == "MaskRCNN":
        from trainer.engine.maskrcnn import MaskRCNN

        return MaskRCNN
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
