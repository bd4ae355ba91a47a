"""Training as a stage: `run_training` is what `mrcnn train` runs, `train_stage` the pipeline's
train task (heads, then all layers) around it.

    train_stage -> {out}/mask_rcnn_{name}_{epoch:04d}.h5, config.yaml, summary.json

Training checkpoints live in `{checkpoint_root}/{pipeline_run_id}/{stage}`, a folder that
outlives the task: a retried task (a preempted GPU node) finds its own checkpoints there and
resumes from the newest one exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import keras

from trainer.config import Config
from trainer.engine.maskrcnn import MaskRCNN
from trainer.engine.training import learning_rate_for
from trainer.errors import UserError
from trainer.io.atomic import copy_atomic, write_atomic
from trainer.stages.fetch import WEIGHTS_FILE
from trainer.stages.inputs import stage_config
from trainer.stages.tracking import StageTracker, TrackingSettings, epoch_metrics_callback
from trainer.weights import checkpoints

SUMMARY_FILE = "summary.json"


def run_training(config: Config, data: str | Path, *, val_data: str | Path | None = None,
                 init: str = "none", exclude: Sequence[str] = (), layers: str = "heads",
                 epochs: int, learning_rate: float = 0.0, lr_factor: float = 1.0,
                 model_dir: str | Path = "runs", augmentation=None,
                 no_augmentation_sources: Sequence[str] | None = None,
                 custom_callbacks: Sequence[keras.callbacks.Callback] | None = None,
                 verbose: int = 1) -> dict:
    """One training stage, as `mrcnn train` and the pipeline run it.

    init: "none" (random initialisation), "last" (the newest checkpoint of config.NAME in
    model_dir: resumes it) or a weights path (loaded by name, `exclude` skipped; a checkpoint
    of ours continues its run and epoch count). learning_rate 0: the config's default (see
    `learning_rate_for`). Returns a JSON-ready summary.
    """
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    for folder in (data, val_data):
        if folder is not None and "://" not in str(folder) and \
                not (Path(folder) / "dataset.json").is_file():
            raise UserError(f"{folder} is not a prepared dataset (no dataset.json): run "
                            "`mrcnn data prepare` first")
    rate = learning_rate_for(config, learning_rate, lr_factor)
    model = MaskRCNN("training", config, model_dir=model_dir)
    loaded = None
    if init == "last":
        loaded = model.find_last()
    elif init != "none":
        loaded = Path(init)
        if not loaded.is_file():
            raise UserError(f"--init {init}: no such weights file (use none, last or a path)")
    if loaded is not None:
        model.load_weights(loaded, by_name=True, exclude=exclude)
        print(f"Loaded {loaded}: continuing at epoch {model.epoch}")
    start_epoch = model.epoch
    history = model.train(data, val_data, learning_rate=rate, epochs=epochs,
                          layers=layers, augmentation=augmentation,
                          custom_callbacks=custom_callbacks,
                          no_augmentation_sources=no_augmentation_sources, verbose=verbose)
    return {
        "init": str(loaded) if loaded is not None else "none",
        "layers": layers,
        "learning_rate": rate,
        "start_epoch": start_epoch,
        "epoch": model.epoch,
        "log_dir": str(model.log_dir),
        "checkpoint": str(model.resume_from) if model.resume_from else None,
        "history": {k: [float(v) for v in values]
                    for k, values in (history.history if history else {}).items()},
    }


def _run_folder_key(pipeline_run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", pipeline_run_id) or "run"


def resolve_init(init_dir: str | None, model_dir: Path, config: Config) -> tuple[str, str]:
    """What a train task starts from, and why (for the log).

    1. Checkpoints of this task in model_dir: a retried task resumes from the newest ("last").
    2. A previous stage's checkpoint in init_dir: copied into a run folder of model_dir, so the
       epoch count continues and this stage's checkpoints land beside it, not in its input.
    3. Fetched weights (init_dir/weights.h5): loaded by name. 4. Nothing: random ("none")."""
    try:
        last = checkpoints.find_last_checkpoint(model_dir, config.NAME)
        return "last", f"resuming from {last} (a retried task)"
    except UserError:
        pass
    folder = Path(init_dir) if init_dir else None
    if folder is not None and folder.is_dir():
        previous = checkpoints.newest_in_folder(folder)
        if previous is not None:
            summary = json.loads((folder / SUMMARY_FILE).read_text())
            copy = model_dir / Path(summary["log_dir"]).name / previous.name
            copy_atomic(previous, copy)
            return str(copy), f"continuing the previous stage's checkpoint {previous.name}"
        if (folder / WEIGHTS_FILE).is_file():
            return str(folder / WEIGHTS_FILE), "loading the fetched weights by name"
    return "none", "random initialisation"


def train_stage(*, config_preset: str, config_yaml: str, overrides: Sequence[str],
                gpu_count: int, stage: str, layers: str, epochs: int, learning_rate: float,
                lr_factor: float, dataset_dir: str, init_dir: str | None,
                exclude: Sequence[str], checkpoint_root: str, out_dir: str,
                tracking: TrackingSettings) -> dict:
    """The pipeline's train task. learning_rate 0 means LEARNING_RATE x lr_factor (matterport
    trains all layers at a tenth of the heads' rate). Returns the last epoch's logs as
    `metrics` and the checkpoint's name and epoch."""
    with StageTracker(tracking, stage) as tracker:
        pipeline_config = stage_config(config_preset, config_yaml, overrides)
        cfg = pipeline_config.replace(GPU_COUNT=gpu_count)
        model_dir = Path(checkpoint_root) / _run_folder_key(tracking.pipeline_run_id) / stage
        init, why = resolve_init(init_dir, model_dir, cfg)
        print(f"{stage}: {why}; checkpoints in {model_dir}", flush=True)
        tracker.log_config(cfg, {"layers": layers, "epochs": epochs,
                                 "learning_rate": learning_rate_for(cfg, learning_rate,
                                                                    lr_factor),
                                 "init": init, "model_dir": str(model_dir)}, pipeline_config)
        tracker.log_dataset(dataset_dir, "training")
        loaded_exclude = list(exclude) if init.endswith(WEIGHTS_FILE) else []
        summary = run_training(cfg, dataset_dir, val_data=dataset_dir, init=init,
                               exclude=loaded_exclude, layers=layers, epochs=epochs,
                               learning_rate=learning_rate, lr_factor=lr_factor,
                               model_dir=model_dir, verbose=2,
                               custom_callbacks=[epoch_metrics_callback(tracker, model_dir)])
        tracker.log_tensorboard(model_dir)  # the last epoch's events, flushed now
        if not summary["checkpoint"]:
            raise UserError(f"{stage}: no checkpoint was written (epochs={epochs} is not past "
                            f"the starting epoch {summary['start_epoch']})")
        checkpoint = Path(summary["checkpoint"])
        out = Path(out_dir)
        copy_atomic(checkpoint, out / checkpoint.name)
        write_atomic(out / "config.yaml", cfg.to_yaml())
        write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True))
        tracker.log_artifact(out / SUMMARY_FILE, "checkpoint")
        tracker.log_artifact(out / checkpoint.name, "checkpoint")
        metrics = {k: values[-1] for k, values in summary["history"].items() if values}
        return {"metrics": metrics, "checkpoint": checkpoint.name, "epoch": summary["epoch"]}
