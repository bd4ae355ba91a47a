"""What evaluation produces from its metrics: the quality-gate verdict, and metrics.json plus a
Markdown report, each written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from trainer.errors import UserError


def gate(metrics: dict, min_map: float | None, key: str = "segm_mAP") -> dict:
    """Quality gate: passed when metrics[key] >= min_map (always, when min_map is None;
    never, when the metric is undefined)."""
    if key not in metrics:
        raise UserError(f"gate metric {key!r} is not among {sorted(metrics)}")
    value = metrics[key]
    passed = True if min_map is None else value is not None and value >= min_map
    return {"passed": bool(passed), "key": key, "value": value, "threshold": min_map}


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> dict[str, Path]:
    """Write `metrics.json` and `report.md` into out_dir atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    write_atomic(paths["metrics"], (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(paths["report"], render_report(metrics).encode())
    return paths


def render_report(metrics: dict) -> str:
    """Markdown: a table of the overall metrics, then one of the per-class results."""
    lines = ["# Evaluation report", "", "| Metric | Value |", "| --- | --- |"]
    for key, value in metrics.items():
        if key != "per_class":
            lines.append(f"| {key} | {_format(value)} |")
    lines += ["", "## Per class", "",
              "| Class | bbox AP | segm AP | VOC AP50 | GT instances | Detections |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, row in metrics.get("per_class", {}).items():
        cells = [row.get(k) for k in ("bbox_AP", "segm_AP", "voc_AP50", "num_gt",
                                      "num_detections")]
        escaped = str(name).replace("|", "\\|")
        lines.append(f"| {escaped} | " + " | ".join(_format(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, then os.replace it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
