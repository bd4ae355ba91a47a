"""train: one training stage (the pipeline runs it twice: heads, then all layers)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(config_preset: str, config_yaml: str, config_overrides: list, gpu_count: int,
          stage: str, layers: str, epochs: int, learning_rate: float, lr_factor: float,
          exclude: list, checkpoint_root: str, upstream: bool, dataset: Input[Dataset],
          init: Input[Model],
          mlflow_tracking_uri: str, mlflow_experiment: str, model: Output[Model],
          metrics: Output[Metrics]):
    """init: fetched weights or the previous stage's model. model: a folder with the final
    checkpoint (mask_rcnn_{name}_{epoch:04d}.h5), config.yaml and summary.json. upstream:
    record the (cached) fetch-weights and prepare-data stages in MLflow from init and dataset."""
    from trainer.stages.tracking import TrackingSettings
    from trainer.stages.train import train_stage

    result = train_stage(
        config_preset=config_preset, config_yaml=config_yaml, overrides=config_overrides,
        gpu_count=gpu_count, stage=stage, layers=layers, epochs=epochs,
        learning_rate=learning_rate, lr_factor=lr_factor, dataset_dir=dataset.path,
        init_dir=init.path, exclude=exclude, checkpoint_root=checkpoint_root,
        out_dir=model.path, upstream=upstream,
        tracking=TrackingSettings.from_env(mlflow_tracking_uri, mlflow_experiment))
    model.metadata.update(checkpoint=result["checkpoint"], epoch=result["epoch"])
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
