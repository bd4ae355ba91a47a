"""prepare-data: generated shapes or a COCO folder -> TFRecord shards + dataset.json."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(source: str, count: int, val_fraction: float, image_size: int,
                 dataset: Output[Dataset], metrics: Output[Metrics]):
    """dataset: the prepared folder (shards, dataset.json, val_annotations.json). The MLflow
    record of this task is written by train-heads from this output."""
    from trainer.stages.prepare import prepare_stage

    summary = prepare_stage(source=source, count=count, val_fraction=val_fraction,
                            image_size=image_size, out_dir=dataset.path)
    for split, counts in summary["splits"].items():
        metrics.log_metric(f"{split}_images", counts["images"])
