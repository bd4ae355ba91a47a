"""The prepare-data stage: generated shapes or a COCO folder into TFRecord shards.

    {out}/ shards, dataset.json, val_annotations.json

The task gets only what shapes the records (source, count, split, the image size of
generated shapes), so KFP's cache reuses it when only training settings or the MLflow
experiment change; its MLflow record is written by the first training task (`track_prepare`).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import Config
from trainer.data.prepare import prepare_dataset
from trainer.stages.tracking import StageTracker, TrackingSettings, failure_recorded

STAGE = "prepare-data"


def prepare_stage(*, source: str, count: int, val_fraction: float, image_size: int,
                  out_dir: str) -> dict:
    """source: "shapes", or a COCO folder (local or gs://) with annotations.json and images/.
    image_size: the side of generated shapes (the config's IMAGE_SHAPE). A failure is
    recorded in MLflow by this task (see `failure_recorded`)."""
    with failure_recorded(STAGE):
        options: dict = {"count": count or None, "val_fraction": val_fraction}
        if source == "shapes":
            options["image_size"] = image_size
        else:
            root = source.rstrip("/")
            options.update(annotations=f"{root}/annotations.json", images=f"{root}/images")
            source = "coco"
        return prepare_dataset(source, out_dir, **options)


def track_prepare(tracking: TrackingSettings, config: Config, dataset_dir: str | Path) -> None:
    """The prepare-data stage run, from its output folder (once per pipeline run)."""
    info_path = Path(dataset_dir) / "dataset.json"
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    with StageTracker(tracking, STAGE, once=True, system_metrics_seconds=0) as tracker:
        tracker.log_config(config, {"dataset_source": info["source"].get("name", "-"),
                                    "dataset_fingerprint": info.get("fingerprint", "-")})
        tracker.log_dataset(dataset_dir, "preparation")
        tracker.log_artifact(info_path, "dataset")
        tracker.log_metrics({f"{split}_images": s["images"]
                             for split, s in info["splits"].items()})
