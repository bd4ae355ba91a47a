"""The evaluate stage: the final checkpoint scored on the val split, the reports, the gate, and
the model registered in MLflow when the gate passes.

    {out}/ metrics.json, report.md, pictures/; a Markdown and an HTML report
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from trainer.data.input import examples, read_dataset_info
from trainer.engine.export import export_saved_model
from trainer.errors import UserError
from trainer.evaluation.report import render_html
from trainer.evaluation.run import evaluate
from trainer.io.atomic import write_atomic
from trainer.stages.inputs import stage_config
from trainer.stages.tracking import EVALUATION_METRICS, StageTracker, TrackingSettings
from trainer.weights import checkpoints

SAVED_MODEL_DIR = "saved_model"


def evaluate_stage(*, config_preset: str, config_yaml: str, overrides: Sequence[str],
                   dataset_dir: str, model_dir: str, limit: int, min_map: float, gate_key: str,
                   num_pictures: int, registered_model_name: str, out_dir: str,
                   markdown_path: str, html_path: str, tracking: TrackingSettings,
                   model_alias: str = "champion") -> dict:
    """Evaluates the final checkpoint and exports it as a SavedModel ({out}/saved_model); when
    the gate passes and registered_model_name is set, registers it in the MLflow Model
    Registry (tagged with the metrics and the pipeline run) and points `model_alias` at the new
    version; a failed gate leaves the alias where it was. Ends the pipeline's parent run."""
    with StageTracker(tracking, "evaluate") as tracker:
        # One device: the evaluate task requests no GPUs whatever the training used.
        pipeline_config = stage_config(config_preset, config_yaml, overrides)
        cfg = pipeline_config.replace(GPU_COUNT=1)
        weights = checkpoints.newest_in_folder(model_dir)
        if weights is None:
            raise UserError(f"evaluate: no checkpoint (mask_rcnn_*.h5) in {model_dir}")
        tracker.log_config(cfg, {"weights": weights.name, "limit": limit, "min_map": min_map,
                                 "gate_key": gate_key}, pipeline_config)
        tracker.log_dataset(dataset_dir, "evaluation")
        result = evaluate(cfg, weights, dataset_dir, out_dir, limit=limit or None,
                          min_map=min_map, gate_key=gate_key, num_pictures=num_pictures)
        gate = result["gate"]
        tracker.log_metrics({key: result[key] for key in EVALUATION_METRICS}, parent=True)
        tracker.log_metrics({"gate_passed": float(gate["passed"])}, parent=True)
        tracker.log_artifact(out_dir, "evaluation")
        report = (Path(out_dir) / "report.md").read_text()
        _write_reports(report, Path(out_dir), result, Path(markdown_path), Path(html_path))
        class_names = list(read_dataset_info(dataset_dir)["class_names"])
        saved_model = export_saved_model(cfg, weights, Path(out_dir) / SAVED_MODEL_DIR,
                                         class_names=class_names)
        result["saved_model"] = str(saved_model)
        result["registered_version"] = None
        if gate["passed"] and registered_model_name:
            result["registered_version"] = tracker.register_model(
                saved_model, _example_image(dataset_dir), registered_model_name,
                alias=model_alias, tags={key: result[key] for key in EVALUATION_METRICS})
        tracker.set_tags({"gate": "passed" if gate["passed"] else "failed"}, parent=True)
        tracker.finish_pipeline()
        return result


def _example_image(dataset_dir: str) -> bytes:
    """The first val image, PNG-encoded: the MLflow model's input example."""
    [example] = examples(dataset_dir, "val").take(1).as_numpy_iterator()
    buffer = io.BytesIO()
    Image.fromarray(example["image"]).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_reports(report: str, out: Path, result: dict, markdown: Path, page: Path) -> None:
    """The report as Markdown, and as one self-contained HTML page with real tables and the
    pictures inlined (the KFP UI shows both without access to the artifact store)."""
    write_atomic(markdown, report)
    pictures = {name: (out / name).read_bytes() for name in result.get("pictures", [])}
    write_atomic(page, render_html(result, result["gate"], pictures))
