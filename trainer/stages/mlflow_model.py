"""The registered model: a checkpoint and its config as an MLflow pyfunc model.

    model = mlflow.pyfunc.load_model("models:/mask-rcnn/3")
    detections = model.predict([image])   # uint8 [H, W, 3] arrays -> matterport's dicts

The model's artifacts are the Keras-2 h5 checkpoint (`weights`) and the resolved config
(`config`, YAML); loading builds the inference model with this package, which the serving
environment must have installed (it is the pipeline's image).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

MODEL_NAME = "model"  # the logged model's name inside its run


class MaskRCNNModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `predict(images)` runs `MaskRCNN.detect` on a list of images."""

    def load_context(self, context) -> None:
        # Imported when MLflow loads the model, not when the pipeline logs it.
        from trainer.config import Config
        from trainer.engine.maskrcnn import MaskRCNN

        config = Config.from_yaml(context.artifacts["config"])
        self.model = MaskRCNN("inference", config)
        self.model.load_weights(context.artifacts["weights"], by_name=True)

    def predict(self, context, model_input, params=None):  # no hints: MLflow would validate
        import numpy as np

        return self.model.detect([np.asarray(image, dtype=np.uint8) for image in model_input])


def log_pyfunc_model(weights: str | Path, config_yaml: str):
    """Logs the model into the active run; returns MLflow's ModelInfo (model_uri, model_id)."""
    import tempfile

    from trainer.version import __version__

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(config_yaml)
        return mlflow.pyfunc.log_model(
            # Models from code: MLflow stores this file and runs it on load (no pickle).
            name=MODEL_NAME, python_model=__file__,
            artifacts={"weights": str(weights), "config": str(config_path)},
            # Listing the requirement skips MLflow's slow inference of the environment.
            pip_requirements=[f"mask-rcnn-pipeline=={__version__}"])


# For models from code: loading this file tells MLflow which model it defines.
mlflow.models.set_model(MaskRCNNModel())
