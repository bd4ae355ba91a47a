"""The prepare-data stage: generated shapes or a COCO folder into TFRecord shards.

    {out}/ shards, dataset.json, val_annotations.json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainer.data.prepare import prepare_dataset
from trainer.stages.inputs import stage_config
from trainer.stages.tracking import StageTracker, TrackingSettings


def prepare_stage(*, config_preset: str, config_yaml: str, overrides: Sequence[str],
                  source: str, count: int, val_fraction: float, out_dir: str,
                  tracking: TrackingSettings) -> dict:
    """source: "shapes", or a COCO folder (local or gs://) with annotations.json and images/."""
    with StageTracker(tracking, "prepare-data") as tracker:
        cfg = stage_config(config_preset, config_yaml, overrides)
        tracker.log_config(cfg, {"dataset_source": source, "dataset_count": count,
                                 "val_fraction": val_fraction})
        options: dict = {"count": count or None, "val_fraction": val_fraction}
        if source == "shapes":
            options["image_size"] = int(cfg.IMAGE_SHAPE[0])
        else:
            root = source.rstrip("/")
            options.update(annotations=f"{root}/annotations.json", images=f"{root}/images")
            source = "coco"
        summary = prepare_dataset(source, out_dir, **options)
        tracker.log_dataset(out_dir, "preparation")
        tracker.log_artifact(Path(out_dir) / "dataset.json", "dataset")
        tracker.log_metrics({f"{split}_images": s["images"]
                             for split, s in summary["splits"].items()})
        return summary
