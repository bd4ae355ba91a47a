"""KFP v2 lightweight components: each body imports `trainer` and calls one stage function
(`trainer.stages`). Only a body's source is shipped to its task, so bodies hold no helpers and
this package holds nothing but the components."""

from components.clean_checkpoints import clean_checkpoints
from components.evaluate import evaluate
from components.fetch_weights import fetch_weights
from components.prepare_data import prepare_data
from components.resolve_config import resolve_config
from components.train import train
from components.train_tfjob import train_tfjob

__all__ = ["clean_checkpoints", "evaluate", "fetch_weights", "prepare_data", "resolve_config",
           "train", "train_tfjob"]
