"""The fetch-weights stage: `fetch_weights` with its report tracked in MLflow.

    {out}/weights.h5 (absent for random initialisation), {out}/report.json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainer.stages.inputs import stage_config
from trainer.stages.tracking import StageTracker, TrackingSettings
from trainer.weights.fetch import REPORT_NAME, fetch_weights

WEIGHTS_FILE = "weights.h5"


def fetch_stage(*, config_preset: str, config_yaml: str, overrides: Sequence[str], source: str,
                sha256: str, exclude: Sequence[str], out_dir: str,
                tracking: TrackingSettings) -> dict:
    with StageTracker(tracking, "fetch-weights") as tracker:
        cfg = stage_config(config_preset, config_yaml, overrides)
        tracker.log_config(cfg, {"weights_source": source, "weights_sha256": sha256 or "-",
                                 "weights_exclude": ",".join(exclude) or "-"})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        try:
            report = fetch_weights(source, out / WEIGHTS_FILE, sha256=sha256 or None,
                                   config=cfg, exclude=list(exclude),
                                   report_path=out / REPORT_NAME)
        finally:
            tracker.log_artifact(out / REPORT_NAME, "weights")
        counts = report.get("counts") or {}
        tracker.log_metrics({f"layers_{k}": v for k, v in counts.items()})
        return report
