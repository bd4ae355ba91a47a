"""The pipeline's stages as plain functions: each resolves its inputs, calls the one library
function that does the work, and tracks it in MLflow (`trainer.tracking`).

The KFP components in `components/` are one call to these; nothing here imports KFP, so the
stages run and are tested without it. Outputs go to folders the caller names (KFP's artifact
paths):

    fetch_stage     -> {out}/weights.h5 (absent for random initialisation), {out}/report.json
    prepare_stage   -> {out}/ shards, dataset.json, val_annotations.json
    train_stage_run -> {out}/mask_rcnn_{name}_{epoch:04d}.h5, config.yaml, summary.json
    evaluate_stage  -> {out}/ metrics.json, report.md, pictures/; a Markdown and an HTML report

Training checkpoints live in `{checkpoint_root}/{pipeline_run_id}/{stage}`, a folder that
outlives the task: a retried task (a preempted GPU node) finds its own checkpoints there and
resumes from the newest one exactly.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from trainer.config import Config
from trainer.errors import UserError
from trainer.tracking import EVALUATION_METRICS, StageTracker, TrackingSettings

WEIGHTS_FILE = "weights.h5"
IMAGE_CONFIG_DIR = Path("/app")  # where the image keeps configs/ (Dockerfile)


def resolve_config(config: str, overrides: Sequence[str] = ()) -> Config:
    """`config` is a YAML document (the resolved config `mrcnn run` and `submit` send) or a
    preset path such as configs/coco.yaml (relative to the working folder, then to /app)."""
    if "\n" in config or ":" in config:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
            handle.write(config)
            handle.flush()
            return Config.from_yaml(handle.name, overrides)
    path = Path(config)
    if not path.is_file() and not path.is_absolute() and (IMAGE_CONFIG_DIR / path).is_file():
        path = IMAGE_CONFIG_DIR / path
    return Config.from_yaml(path, overrides)


def _start(tracker: StageTracker, config: Config, params: dict,
           pipeline_config: Config | None = None) -> None:
    """The resolved config as the stage's params and config.yaml; the pipeline's config (before
    a stage's own device settings, the same in every stage) as the parent's params."""
    tracker.log_params({**config.to_dict(), **params})
    tracker.log_params((pipeline_config or config).to_dict(), parent=True)
    tracker.log_text(config.to_yaml(), "config.yaml")


# === fetch-weights ===


def fetch_stage(*, config: str, overrides: Sequence[str], source: str, sha256: str,
                exclude: Sequence[str], out_dir: str, tracking: TrackingSettings) -> dict:
    from trainer.fetch import fetch_weights

    with StageTracker(tracking, "fetch-weights") as tracker:
        cfg = resolve_config(config, overrides)
        _start(tracker, cfg, {"weights_source": source, "weights_sha256": sha256 or "-",
                              "weights_exclude": ",".join(exclude) or "-"})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        try:
            report = fetch_weights(source, out / WEIGHTS_FILE, sha256=sha256 or None,
                                   config=cfg, exclude=list(exclude))
        finally:
            tracker.log_artifact(out / "report.json", "weights")
        counts = report.get("counts") or {}
        tracker.log_metrics({f"layers_{k}": v for k, v in counts.items()})
        return report


# === prepare-data ===


def prepare_stage(*, config: str, overrides: Sequence[str], source: str, count: int,
                  val_fraction: float, out_dir: str, tracking: TrackingSettings) -> dict:
    """source: "shapes", or a COCO folder (local or gs://) with annotations.json and images/."""
    from trainer.data.prepare import prepare_dataset

    with StageTracker(tracking, "prepare-data") as tracker:
        cfg = resolve_config(config, overrides)
        _start(tracker, cfg, {"dataset_source": source, "dataset_count": count,
                              "val_fraction": val_fraction})
        options: dict = {"count": count or None, "val_fraction": val_fraction}
        if source == "shapes":
            options["image_size"] = int(cfg.IMAGE_SHAPE[0])
        else:
            root = source.rstrip("/")
            options.update(annotations=f"{root}/annotations.json", images=f"{root}/images")
            source = "coco"
        summary = prepare_dataset(source, out_dir, **options)
        tracker.log_artifact(Path(out_dir) / "dataset.json", "dataset")
        tracker.log_metrics({f"{split}_images": s["images"]
                             for split, s in summary["splits"].items()})
        return summary


# === train (heads, all) ===


def _run_folder_key(pipeline_run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", pipeline_run_id) or "run"


def resolve_init(init_dir: str | None, model_dir: Path, config: Config) -> tuple[str, str]:
    """What a train task starts from, and why (for the log).

    1. Checkpoints of this task in model_dir: a retried task resumes from the newest ("last").
    2. A previous stage's checkpoint in init_dir: copied into a run folder of model_dir, so the
       epoch count continues and this stage's checkpoints land beside it, not in its input.
    3. Fetched weights (init_dir/weights.h5): loaded by name. 4. Nothing: random ("none")."""
    from trainer import checkpoints

    try:
        last = checkpoints.find_last_checkpoint(model_dir, config.NAME)
        return "last", f"resuming from {last} (a retried task)"
    except UserError:
        pass
    folder = Path(init_dir) if init_dir else None
    if folder is not None and folder.is_dir():
        ours = sorted(folder.glob("mask_rcnn_*.h5"))
        if ours:
            summary = json.loads((folder / "summary.json").read_text())
            run = model_dir / Path(summary["log_dir"]).name
            run.mkdir(parents=True, exist_ok=True)
            copy = run / ours[-1].name
            shutil.copyfile(ours[-1], copy.with_name(f".{copy.name}.tmp"))
            os.replace(copy.with_name(f".{copy.name}.tmp"), copy)
            return str(copy), f"continuing the previous stage's checkpoint {ours[-1].name}"
        if (folder / WEIGHTS_FILE).is_file():
            return str(folder / WEIGHTS_FILE), "loading the fetched weights by name"
    return "none", "random initialisation"


def stage_layers(layers: str, init: str) -> str:
    """The layers a stage trains. From random initialisation ("none") the heads stage trains
    all layers: a frozen random backbone gives the heads features nothing will keep, and
    the stage's steps are better spent on the whole network (the train-all stage then
    continues at a tenth of the rate, a step decay)."""
    return "all" if init == "none" and layers == "heads" else layers


def train_stage_run(*, config: str, overrides: Sequence[str], gpu_count: int, stage: str,
                    layers: str, epochs: int, learning_rate: float, default_lr_factor: float,
                    dataset_dir: str, init_dir: str | None, exclude: Sequence[str],
                    checkpoint_root: str, out_dir: str, tracking: TrackingSettings) -> dict:
    """One training stage. learning_rate 0 means LEARNING_RATE x default_lr_factor (matterport
    trains all layers at a tenth of the heads' rate). Returns the last epoch's logs as
    `metrics` and the checkpoint's name and epoch."""
    from trainer.tracking import epoch_metrics_callback
    from trainer.training import train_stage

    with StageTracker(tracking, stage) as tracker:
        pipeline_config = resolve_config(config, overrides)
        cfg = pipeline_config.replace(GPU_COUNT=gpu_count)
        model_dir = Path(checkpoint_root) / _run_folder_key(tracking.pipeline_run_id) / stage
        init, why = resolve_init(init_dir, model_dir, cfg)
        print(f"{stage}: {why}; checkpoints in {model_dir}", flush=True)
        if stage_layers(layers, init) != layers:
            layers = stage_layers(layers, init)
            print(f"{stage}: random initialisation: training all layers (heads on an untrained, "
                  "frozen backbone would learn nothing lasting)", flush=True)
        rate = learning_rate if learning_rate > 0 else cfg.LEARNING_RATE * default_lr_factor
        _start(tracker, cfg, {"layers": layers, "epochs": epochs, "learning_rate": rate,
                              "init": init, "model_dir": str(model_dir)}, pipeline_config)
        loaded_exclude = list(exclude) if init.endswith(WEIGHTS_FILE) else []
        summary = train_stage(cfg, dataset_dir, val_data=dataset_dir, init=init,
                              exclude=loaded_exclude, layers=layers, epochs=epochs,
                              learning_rate=rate, model_dir=model_dir,
                              custom_callbacks=[epoch_metrics_callback(tracker)], verbose=2)
        if not summary["checkpoint"]:
            raise UserError(f"{stage}: no checkpoint was written (epochs={epochs} is not past "
                            f"the starting epoch {summary['start_epoch']})")
        checkpoint = Path(summary["checkpoint"])
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, out / checkpoint.name)
        (out / "config.yaml").write_text(cfg.to_yaml())
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        tracker.log_artifact(out / "summary.json", "checkpoint")
        tracker.log_artifact(out / checkpoint.name, "checkpoint")
        metrics = {k: values[-1] for k, values in summary["history"].items() if values}
        return {"metrics": metrics, "checkpoint": checkpoint.name, "epoch": summary["epoch"]}


# === evaluate ===


def evaluate_stage(*, config: str, overrides: Sequence[str], dataset_dir: str, model_dir: str,
                   limit: int, min_map: float, gate_key: str, num_pictures: int,
                   registered_model_name: str, out_dir: str, markdown_path: str,
                   html_path: str, tracking: TrackingSettings) -> dict:
    """Evaluates the final checkpoint; when the gate passes and registered_model_name is set,
    registers it in the MLflow Model Registry. Ends the pipeline's parent run."""
    from trainer.evaluate_run import evaluate

    with StageTracker(tracking, "evaluate") as tracker:
        # One device: the evaluate task requests no GPUs whatever the training used.
        pipeline_config = resolve_config(config, overrides)
        cfg = pipeline_config.replace(GPU_COUNT=1)
        found = sorted(Path(model_dir).glob("mask_rcnn_*.h5"))
        if not found:
            raise UserError(f"evaluate: no checkpoint (mask_rcnn_*.h5) in {model_dir}")
        weights = found[-1]
        _start(tracker, cfg, {"weights": weights.name, "limit": limit, "min_map": min_map,
                              "gate_key": gate_key}, pipeline_config)
        result = evaluate(cfg, weights, dataset_dir, out_dir, limit=limit or None,
                          min_map=min_map, gate_key=gate_key, num_pictures=num_pictures)
        gate = result["gate"]
        tracker.log_metrics({key: result[key] for key in EVALUATION_METRICS}, parent=True)
        tracker.log_metrics({"gate_passed": float(gate["passed"])}, parent=True)
        tracker.log_artifact(out_dir, "evaluation")
        report = (Path(out_dir) / "report.md").read_text()
        _write_reports(report, Path(out_dir), result, Path(markdown_path), Path(html_path))
        result["registered_version"] = None
        if gate["passed"] and registered_model_name:
            result["registered_version"] = tracker.register_model(
                weights, cfg.to_yaml(), registered_model_name)
        tracker.set_tags({"gate": "passed" if gate["passed"] else "failed"}, parent=True)
        tracker.finish_pipeline()
        return result


def _write_reports(report: str, out: Path, result: dict, markdown: Path, page: Path) -> None:
    """The report as Markdown, and as one HTML page with the pictures inlined (the KFP UI
    shows both without access to the artifact store's other files)."""
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(report)
    images = "".join(
        f'<figure><img src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>'
        f"{html.escape(name)}</figcaption></figure>" for name in result.get("pictures", []))
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f"<!doctype html><html><body><pre>{html.escape(report)}</pre>"
                    f"{images}</body></html>\n")
