"""The fetch-weights stage: `fetch_weights` into the task's output folder.

    {out}/weights.h5 (absent for random initialisation), {out}/report.json

The task gets only what decides its result (the source, its checksum, the exclude list and
the model-shape keys of the config: `Config.model_shape_yaml`), so KFP's cache reuses it when
only training settings or the MLflow experiment change. Its MLflow record is written by the
first training task from this output (`track_fetch`), cached or not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from trainer.config import Config
from trainer.stages.tracking import StageTracker, TrackingSettings, failure_recorded
from trainer.weights.fetch import REPORT_NAME, fetch_weights

WEIGHTS_FILE = "weights.h5"
STAGE = "fetch-weights"


def fetch_stage(*, model_config: str, source: str, sha256: str, exclude: Sequence[str],
                out_dir: str) -> dict:
    """model_config: YAML of the model-shape keys (`Config.model_shape_yaml`). A failure is
    recorded in MLflow by this task (see `failure_recorded`)."""
    with failure_recorded(STAGE):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return fetch_weights(source, out / WEIGHTS_FILE, sha256=sha256 or None,
                             config=Config.from_text(model_config, source="model_config"),
                             exclude=list(exclude), report_path=out / REPORT_NAME)


def track_fetch(tracking: TrackingSettings, config: Config, weights_dir: str | Path) -> None:
    """The fetch-weights stage run, from its output folder (once per pipeline run)."""
    report_path = Path(weights_dir) / REPORT_NAME
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text())
    with StageTracker(tracking, STAGE, once=True, system_metrics_seconds=0) as tracker:
        tracker.log_config(config, {
            "weights_source": report.get("source", "-"),
            "weights_sha256": report.get("sha256") or "-",
            "weights_exclude": ",".join(report.get("exclude", [])) or "-"})
        tracker.log_artifact(report_path, "weights")
        counts = report.get("counts") or {}
        tracker.log_metrics({f"layers_{k}": v for k, v in counts.items()})
