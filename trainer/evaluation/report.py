"""What evaluation produces from its metrics: the quality-gate verdict, and metrics.json plus a
Markdown report, each written atomically."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from trainer.errors import UserError
from trainer.io.atomic import write_atomic


def gate(metrics: dict, min_map: float | None, key: str = "segm_mAP") -> dict:
    """Quality gate: passed when metrics[key] >= min_map (always, when min_map is None;
    never, when the metric is undefined)."""
    if key not in metrics:
        raise UserError(f"gate metric {key!r} is not among {sorted(metrics)}")
    value = metrics[key]
    passed = True if min_map is None else value is not None and value >= min_map
    return {"passed": bool(passed), "key": key, "value": value, "threshold": min_map}


def write_reports(out_dir: str | os.PathLike, metrics: dict, verdict: dict | None = None,
                  pictures: list[str] = ()) -> dict[str, Path]:
    """metrics.json (the metrics, the gate verdict, the pictures' paths) and report.md (tables,
    the gate, the pictures) in out_dir, each written atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    extra = {"gate": verdict, "pictures": list(pictures)} if verdict is not None else {}
    write_atomic(paths["metrics"],
                 json.dumps({**metrics, **extra}, indent=2, sort_keys=True) + "\n")
    write_atomic(paths["report"], render_report(metrics, verdict, pictures))
    return paths


def render_report(metrics: dict, verdict: dict | None = None, pictures: list[str] = ()) -> str:
    """Markdown: a table of the overall metrics, one of the per-class results, then the gate's
    verdict and links to the pictures when given."""
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
    if verdict is not None:
        lines += ["", "## Quality gate", ""]
        if verdict["threshold"] is None:
            lines.append(f"No threshold set: passed. ({verdict['key']} = "
                         f"{_format(verdict['value'])})")
        else:
            outcome = "passed" if verdict["passed"] else "FAILED"
            lines.append(f"{outcome}: {verdict['key']} = {_format(verdict['value'])}, required "
                         f">= {verdict['threshold']}")
    if pictures:
        lines += ["", "## Pictures", "", "Predictions (left) beside the ground truth (right).",
                  ""]
        lines += [f"![{Path(p).stem}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_html(metrics: dict, verdict: dict | None, pictures: dict[str, bytes]) -> str:
    """One self-contained HTML page (what the KFP UI shows): the overall metrics and the
    per-class results as tables, the gate's verdict, and the pictures inlined as PNG data URIs
    (`pictures`: name -> PNG bytes). No external links: the UI shows it without access to the
    artifact store."""
    esc = html.escape
    overall = "".join(f"<tr><th>{esc(str(key))}</th><td>{esc(_format(value))}</td></tr>"
                      for key, value in metrics.items()
                      if not isinstance(value, (dict, list)))  # per_class, gate: below
    columns = ("bbox_AP", "segm_AP", "voc_AP50", "num_gt", "num_detections")
    per_class = "".join(
        f"<tr><th>{esc(str(name))}</th>"
        + "".join(f"<td>{esc(_format(row.get(k)))}</td>" for k in columns) + "</tr>"
        for name, row in metrics.get("per_class", {}).items())
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;"
             "margin-bottom:1.5em}th,td{border:1px solid #bbb;padding:.25em .6em;"
             "text-align:left}td{font-variant-numeric:tabular-nums}"
             ".passed{color:#060}.failed{color:#a00}img{max-width:100%;"
             "image-rendering:pixelated}figure{margin:0 0 1.5em}</style></head><body>",
             "<h1>Evaluation report</h1>"]
    if verdict is not None:
        outcome = "passed" if verdict["passed"] else "failed"
        rule = ("no threshold set" if verdict["threshold"] is None
                else f"required &gt;= {esc(str(verdict['threshold']))}")
        parts.append(f"<p class='{outcome}' id='gate'><strong>Quality gate {outcome.upper()}"
                     f"</strong>: {esc(verdict['key'])} = {esc(_format(verdict['value']))}, "
                     f"{rule}</p>")
    parts += ["<h2>Metrics</h2><table id='metrics'>", overall, "</table>",
              "<h2>Per class</h2><table id='per-class'><tr><th>Class</th>"
              + "".join(f"<th>{c}</th>" for c in ("bbox AP", "segm AP", "VOC AP50",
                                                 "GT instances", "Detections")) + "</tr>",
              per_class, "</table>"]
    if pictures:
        parts.append("<h2>Pictures</h2><p>Predictions (left) beside the ground truth "
                     "(right).</p>")
        for name, png in pictures.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(name)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "".join(parts)
