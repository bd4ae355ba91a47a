"""The MLflow model ("models from code"): the exported SavedModel behind MLflow's pyfunc API.

MLflow runs this file itself when the model is loaded or served: it needs TensorFlow, NumPy and
pandas, nothing of ours, so the registered model serves outside the project's image. Input: a
DataFrame with a binary column `image` (JPEG/PNG bytes; the REST API takes them base64-encoded,
as the signature says). Output: one dict per image, the SavedModel's outputs trimmed to its
detections: boxes [[y1, x1, y2, x2]] in image pixels (y2/x2 exclusive), class_ids,
class_names, scores, and masks (per-detection MASK_SHAPE probability maps inside each box).
"""

import mlflow
import numpy as np
import tensorflow as tf

SAVED_MODEL = "saved_model"  # the artifact key of the SavedModel folder (mlflow_model.py)
FIELDS = ("boxes", "class_ids", "class_names", "scores", "masks")


class MaskRCNNServing(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.serve = tf.saved_model.load(context.artifacts[SAVED_MODEL]) \
            .signatures["serving_default"]

    def predict(self, context, model_input, params=None):  # no hints: MLflow would validate
        images = [bytes(image) for image in model_input["image"]]
        outputs = {k: v.numpy() for k, v in self.serve(images=tf.constant(images)).items()}
        results = []
        for i, count in enumerate(outputs["num_detections"]):
            row = {name: outputs[name][i][:count] for name in FIELDS}
            row["class_names"] = [name.decode() for name in row["class_names"]]
            row["masks"] = np.round(row["masks"], 4)
            results.append({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                            for k, v in row.items()})
        return results


mlflow.models.set_model(MaskRCNNServing())
