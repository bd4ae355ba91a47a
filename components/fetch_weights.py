"""fetch-weights: pretrained weights checked against the configured model (or none)."""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_weights(config_preset: str, config_yaml: str,
                  config_overrides: list, source: str, sha256: str, exclude: list,
                  mlflow_tracking_uri: str, mlflow_experiment: str,
                  weights: Output[Model], metrics: Output[Metrics]):
    """weights: a folder with weights.h5 (absent for source "none") and report.json."""
    from trainer.stages.fetch import fetch_stage
    from trainer.stages.tracking import TrackingSettings

    report = fetch_stage(
        config_preset=config_preset, config_yaml=config_yaml, overrides=config_overrides,
        source=source, sha256=sha256,
        exclude=exclude, out_dir=weights.path,
        tracking=TrackingSettings.from_env(mlflow_tracking_uri, mlflow_experiment))
    weights.metadata["initialisation"] = report["initialisation"]
    for key, value in (report.get("counts") or {"matched": 0}).items():
        metrics.log_metric(f"layers_{key}", value)
