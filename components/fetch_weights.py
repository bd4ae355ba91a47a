"""fetch-weights: pretrained weights checked against the configured model (or none)."""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_weights(model_config: str, source: str, sha256: str, exclude: list,
                  weights: Output[Model], metrics: Output[Metrics]):
    """weights: a folder with weights.h5 (absent for source "none") and report.json.
    model_config: the model-shape keys (resolve-config); the MLflow record of this task is
    written by train-heads from this output, so a cached run is recorded too."""
    from trainer.stages.fetch import fetch_stage

    report = fetch_stage(model_config=model_config, source=source, sha256=sha256,
                         exclude=exclude, out_dir=weights.path)
    weights.metadata["initialisation"] = report["initialisation"]
    for key, value in (report.get("counts") or {"matched": 0}).items():
        metrics.log_metric(f"layers_{key}", value)
