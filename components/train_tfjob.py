"""train_tfjob: one training stage on `workers` GPU pods, as a Kubeflow TFJob that this
CPU-only task creates, watches and deletes (the pipeline runs it instead of `train` when
workers > 1). Same inputs and outputs as `train`."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_tfjob(config_preset: str, config_yaml: str, config_overrides: list, workers: int,
                gpu_count: int, gpu_type: str, stage: str, layers: str, epochs: int,
                learning_rate: float, lr_factor: float, exclude: list, checkpoint_root: str,
                checkpoint_pvc: str, checkpoint_mount: str, upstream: bool,
                pod_resources: dict, node_selector: dict, toleration: dict,
                dataset: Input[Dataset], init: Input[Model], mlflow_tracking_uri: str,
                mlflow_experiment: str, model: Output[Model], metrics: Output[Metrics]):
    """workers: pods of the TFJob (1 chief + workers-1 workers), each with gpu_count GPUs of
    resource gpu_type, pod_resources (cpu, memory), on the node pool of node_selector with
    toleration, and the claim checkpoint_pvc (ReadWriteMany) at checkpoint_mount. model: the
    chief's final checkpoint, config.yaml and summary.json, as `train` writes them."""
    from trainer.stages.tfjob import launch_training
    from trainer.version import IMAGE as image

    result = launch_training(
        stage=stage, workers=workers, config_preset=config_preset, config_yaml=config_yaml,
        overrides=config_overrides, gpu_count=gpu_count, gpu_resource=gpu_type, layers=layers,
        epochs=epochs, learning_rate=learning_rate, lr_factor=lr_factor,
        dataset_path=dataset.path, dataset_uri=dataset.uri, init_dir=init.path,
        exclude=exclude, checkpoint_root=checkpoint_root, checkpoint_pvc=checkpoint_pvc,
        checkpoint_mount=checkpoint_mount, upstream=upstream,
        mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
        pod_resources=pod_resources, node_selector=node_selector, toleration=toleration,
        image=image, out_dir=model.path)
    model.metadata.update(checkpoint=result["checkpoint"], epoch=result["epoch"])
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
