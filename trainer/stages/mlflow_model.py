"""Logging the MLflow model: the exported SavedModel with `serving_model.py` as its code.

    info = log_serving_model(Path("eval/saved_model"), png_bytes)   # inside an active run

The logged model needs nothing of ours to load or serve: MLflow stores `serving_model.py`
("models from code", no pickle) and the SavedModel folder; its environment lists TensorFlow,
NumPy, pandas and MLflow at this process's versions. It carries a signature (a binary column
`image`) and an input example (one encoded image), so `mlflow models serve` and the registry UI
know what a request looks like.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

MODEL_NAME = "model"  # the logged model's name inside its run
SERVING_CODE = Path(__file__).with_name("serving_model.py")
SAVED_MODEL = "saved_model"  # the artifact key serving_model.py loads the SavedModel from


def log_serving_model(saved_model: str | Path, example_image: bytes):
    """Logs the SavedModel into the active run; returns MLflow's ModelInfo (model_uri, ...)."""
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(SERVING_CODE),
        artifacts={SAVED_MODEL: str(saved_model)},
        signature=ModelSignature(inputs=Schema([ColSpec("binary", "image")])),
        input_example=pd.DataFrame({"image": [example_image]}),
        # Listing the requirements skips MLflow's slow inference of the environment.
        pip_requirements=[f"tensorflow=={tf.__version__}", f"numpy=={np.__version__}",
                          f"pandas=={pd.__version__}", f"mlflow=={mlflow.__version__}"])
