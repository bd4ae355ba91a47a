"""fetch-weights: pretrained weights from gs://, https:// or a path, checked before training.

    report = fetch_weights("gs://bucket/mask_rcnn_coco.h5", Path("work/weights.h5"),
                           config=cfg, exclude=CLASS_SPECIFIC_LAYERS)

`out` is this stage's output. After a successful call it holds weights of `source` that fit
the model `config` builds; after a failed one it is as it was. The report says which (`ok`,
`error`, layer counts and lists). The file is downloaded under a hidden name beside `out`,
its layer names and shapes are compared with the model's (no arrays are loaded), and only
then is it moved to `out`. `source="none"` means random initialisation: the report says so,
no file is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.config import Config
from trainer.errors import UserError
from trainer.io import storage
from trainer.io.atomic import atomic_path, write_atomic
from trainer.model.mask_rcnn import build_inference_model
from trainer.weights.by_name import (
    WeightsMismatchError,
    WeightsReport,
    inspect_weights,
    model_layout,
    parse_exclude,
)
from trainer.weights.h5layout import read_layout

RANDOM_SOURCE = "none"
HUB_SOURCES = ("imagenet",)  # matterport's samples download these from model hubs; we do not
REPORT_NAME = "report.json"


class UnsupportedSourceError(UserError, ValueError):
    """The source names something this stage does not fetch (a model hub)."""


class ArchitectureMismatchError(WeightsMismatchError):
    """Too few of the model's layers would load from the file: weights of another model."""


# === Inspection ===


@dataclass(frozen=True)
class Inspection:
    """A weights file compared with a model: the per-layer report and the two layer counts."""

    report: WeightsReport
    model_layers: int  # the model's top-level layers that hold weights
    file_layers: int  # the file's layers that store at least one array
    shared_layers: int  # layers with weights in both, by name, whether excluded or not

    @property
    def matched_fraction(self) -> float:
        return len(self.report.matched) / self.model_layers if self.model_layers else 0.0

    def summary(self) -> dict:
        """JSON-ready: counts, the layer lists, shape mismatches and the file's Keras version."""
        report = self.report.to_dict()
        for key in ("path", "by_name", "ok"):  # `ok` is decided by `check_fit`, not here
            report.pop(key)
        counts = {
            "model_layers": self.model_layers,
            "file_layers": self.file_layers,
            "shared": self.shared_layers,
            "matched": len(self.report.matched),
            "missing": len(self.report.missing_in_file),
            "unused": len(self.report.unused_in_file),
            "mismatched": len(self.report.mismatched_layers),
            "excluded": len(self.report.excluded),
        }
        return {**report, "counts": counts, "matched_fraction": round(self.matched_fraction, 4)}


def inspect_file(path: str | os.PathLike, config: Config, exclude: Iterable[str] = ()
                 ) -> Inspection:
    """Compare the h5 at `path` with the model `config` builds (inference mode: same layers).

    The file is read first, so a file that is not Keras weights fails before the model is
    built. Raises WeightsFileError for a missing, non-HDF5, truncated or non-Keras file."""
    file_layers = read_layout(path).weighted_layers
    keras_model = build_inference_model(config)
    model_layers = [layer.name for layer in model_layout(keras_model)]
    report = inspect_weights(path, keras_model, exclude=list(exclude))
    shared = len(set(model_layers) & set(file_layers))
    return Inspection(report, len(model_layers), len(file_layers), shared)


def check_fit(inspection: Inspection, *, exclude: Iterable[str] = (),
              min_matched_fraction: float = 0.5, name: str | None = None) -> None:
    """Raise a one-line UserError unless the file would load into the model.

    A file sharing fewer than `min_matched_fraction` of the model's weighted layers by name
    is for another architecture (ArchitectureMismatchError); shape or weight-count mismatches
    outside `exclude` raise WeightsMismatchError naming the layers and the exclude list that
    fixes them; excluding so much that too few layers load is an ArchitectureMismatchError."""
    report, total = inspection.report, inspection.model_layers
    name = name or report.path
    needed = math.ceil(min_matched_fraction * total - 1e-9)  # 0.5 x 131 -> 66; 25/131 x 131 -> 25
    if (shared := inspection.shared_layers) < needed:
        file_names = report.unused_in_file[:3]
        seen = f"; the file holds layers such as {', '.join(file_names)}" if file_names else ""
        raise ArchitectureMismatchError(
            f"{name} is not weights for this model: only {shared} of its {total} layers with "
            f"weights are in the file (at least {needed} needed, min_matched_fraction="
            f"{min_matched_fraction}){seen}; use weights trained with the same BACKBONE")
    report.raise_for_mismatch(list(exclude))
    if len(report.matched) < needed:
        raise ArchitectureMismatchError(
            f"only {len(report.matched)} of the model's {total} layers with weights would load "
            f"from {name} (at least {needed} needed, min_matched_fraction="
            f"{min_matched_fraction}); exclude fewer layers than {sorted(report.excluded)}")


# === Arguments ===


def _expected_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    text = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise UserError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return text


def _check_source(source: str) -> None:
    if not source:
        raise UserError("no weights source: give gs://BUCKET/KEY, https://URL, a path, or "
                        f"{RANDOM_SOURCE!r} for random initialisation")
    if source.lower() in HUB_SOURCES:
        raise UnsupportedSourceError(
            f"weights source {source!r} is not supported: nothing is downloaded from model "
            "hubs; pass a Keras-2 .h5 (gs://, https:// or a path), e.g. matterport's "
            f"mask_rcnn_coco.h5, or {RANDOM_SOURCE!r} to start from random initialisation")


# === Files ===


def _write_report(path: Path, report: dict) -> None:
    write_atomic(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def report_path_for(out: Path) -> Path:
    """Where the report of a fetch to `out` goes unless the caller names a path."""
    return out.with_name(out.name + ".report.json")


def _model_summary(config: Config) -> dict:
    return {"BACKBONE": config.BACKBONE, "NUM_CLASSES": config.NUM_CLASSES}


def _warnings(config: Config, initialisation: str, unverified_sha256: str | None = None
              ) -> list[str]:
    """`unverified_sha256`: the digest of a file fetched without an expected one."""
    warnings = []
    if initialisation == "random" and not config.TRAIN_BN and config.NORM == "batch":
        warnings.append("TRAIN_BN is false: BatchNorm statistics stay at their initial values; "
                        "training from random initialisation needs TRAIN_BN=true")
    if unverified_sha256 is not None:
        warnings.append(f"no sha256 given: the file was not verified; its sha256 is "
                        f"{unverified_sha256} (pin it with --sha256, the pipeline parameter "
                        "weights_sha256 or the ConfigMap key WEIGHTS_SHA256)")
    return warnings


# === Public API ===


def fetch_weights(
    source: str,
    out: str | os.PathLike,
    *,
    sha256: str | None = None,
    config: Config | None = None,
    exclude: Iterable[str] | str = (),
    min_matched_fraction: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    progress: storage.Progress | None = None,
    retries: int = 4,
    backoff_seconds: float | None = None,
    report_path: str | os.PathLike | None = None,
) -> dict:
    """Fetch `source` (gs://, http(s)://, file:// or a path) to `out` if it fits the model.

    `config` (default: `Config()`, matterport's defaults) builds the model the file must fit;
    `exclude` names layers not to load (e.g. CLASS_SPECIFIC_LAYERS for another NUM_CLASSES).
    Writes the report to `report_path` (default `{out}.report.json`, a name derived from
    `out`, so it never replaces an unrelated file) and returns it: source, bytes, sha256, the
    file's Keras version and backend, layer counts and lists, `ok`, `error` and `warnings`
    (one says so when no `sha256` was given: the file was not verified).
    `source="none"` is random initialisation: no file is written and `out` is left alone.
    Raises a one-line UserError (StorageError, WeightsFileError, WeightsMismatchError,
    ArchitectureMismatchError, UnsupportedSourceError); then `out` is as it was before the
    call (present or not) and the report holds `ok: false` and the error."""
    source, out = str(source).strip(), Path(out).expanduser()
    config = config if config is not None else Config()
    exclude = parse_exclude(exclude)
    expected = _expected_sha256(sha256)
    if not 0.0 <= min_matched_fraction <= 1.0:
        raise UserError(f"min_matched_fraction must be in [0, 1], got {min_matched_fraction}")
    _check_source(source)
    report_path = Path(report_path) if report_path is not None else report_path_for(out)
    report: dict = {"source": source, "model": _model_summary(config), "exclude": exclude}

    if source.lower() == RANDOM_SOURCE:
        report.update(source=RANDOM_SOURCE, initialisation="random", out=None, ok=True,
                      error=None, warnings=_warnings(config, "random"))
        _write_report(report_path, report)
        return report

    report.update(initialisation="pretrained", out=str(out),
                  min_matched_fraction=min_matched_fraction)
    fetching: list[Path] = []  # the temporary path, to name the source instead in errors
    try:
        with atomic_path(out) as tmp:
            fetching.append(tmp)
            result = storage.download(
                source, tmp, sha256=expected, cache_dir=Path(cache_dir) if cache_dir else None,
                retries=retries, progress=progress,
                backoff_seconds=storage.BACKOFF_SECONDS if backoff_seconds is None
                else backoff_seconds)
            report.update(bytes=result.bytes, sha256=result.sha256,
                          from_cache=result.from_cache)
            inspection = inspect_file(tmp, config, exclude)
            report.update(inspection.summary())
            check_fit(inspection, exclude=exclude, min_matched_fraction=min_matched_fraction,
                      name=source)
    except UserError as err:
        message = str(err)
        for tmp in fetching:
            message = message.replace(str(tmp), source)
        report.update(ok=False, error=message)
        _write_report(report_path, report)
        raise type(err)(message) from err
    report.update(ok=True, error=None, warnings=_warnings(
        config, "pretrained", unverified_sha256=None if expected else report["sha256"]))
    _write_report(report_path, report)
    return report
