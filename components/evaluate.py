"""evaluate: COCO and VOC mAP of the final checkpoint, the report, and the quality gate."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(config_preset: str, config_yaml: str,
             config_overrides: list, limit: int, min_map: float, gate_key: str,
             num_pictures: int, registered_model_name: str, model_alias: str,
             dataset: Input[Dataset],
             model: Input[Model], mlflow_tracking_uri: str, mlflow_experiment: str,
             metrics: Output[Metrics],
             report: Output[Markdown], pictures: Output[HTML], evaluation: Output[Artifact]):
    """metrics: the five mAPs and gate_passed (the KFP UI shows them); report: report.md;
    pictures: the report with the prediction pictures; evaluation: the output folder."""
    from trainer.stages.evaluate import evaluate_stage
    from trainer.stages.tracking import TrackingSettings

    result = evaluate_stage(
        config_preset=config_preset, config_yaml=config_yaml, overrides=config_overrides,
        dataset_dir=dataset.path,
        model_dir=model.path, limit=limit, min_map=min_map, gate_key=gate_key,
        num_pictures=num_pictures, registered_model_name=registered_model_name,
        model_alias=model_alias,
        out_dir=evaluation.path, markdown_path=report.path, html_path=pictures.path,
        tracking=TrackingSettings.from_env(mlflow_tracking_uri, mlflow_experiment))
    for key in ("bbox_mAP", "bbox_mAP50", "segm_mAP", "segm_mAP50", "voc_mAP50"):
        if result[key] is not None:
            metrics.log_metric(key, result[key])
    metrics.log_metric("gate_passed", float(result["gate"]["passed"]))
