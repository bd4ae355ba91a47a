"""prepare-data: generated shapes or a COCO folder -> TFRecord shards + dataset.json."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(config_preset: str, config_yaml: str,
                 config_overrides: list, source: str, count: int,
                 val_fraction: float, mlflow_tracking_uri: str, mlflow_experiment: str,
                 dataset: Output[Dataset],
                 metrics: Output[Metrics]):
    """dataset: the prepared folder (shards, dataset.json, val_annotations.json)."""
    from trainer.stages.prepare import prepare_stage
    from trainer.stages.tracking import TrackingSettings

    summary = prepare_stage(
        config_preset=config_preset, config_yaml=config_yaml, overrides=config_overrides,
        source=source, count=count,
        val_fraction=val_fraction, out_dir=dataset.path,
        tracking=TrackingSettings.from_env(mlflow_tracking_uri, mlflow_experiment))
    for split, counts in summary["splits"].items():
        metrics.log_metric(f"{split}_images", counts["images"])
