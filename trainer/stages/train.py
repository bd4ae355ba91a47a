"""Training as a stage: `run_training` is what `mrcnn train` runs, `train_stage` the pipeline's
train task (heads, then all layers) around it.

    train_stage -> {out}/mask_rcnn_{name}_{epoch:04d}.h5, config.yaml, summary.json

Training checkpoints live in `{checkpoint_root}/{pipeline_run_id}/{stage}`, a folder that
outlives the task: a retried task (a preempted GPU node) finds its own checkpoints there and
resumes from the newest one exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import keras

from trainer.config import Config
from trainer.data.input import check_classes, read_dataset_info, shard_paths
from trainer.engine.maskrcnn import MaskRCNN
from trainer.engine.strategy import cluster_task, is_chief
from trainer.engine.training import learning_rate_for, resolve_layers
from trainer.errors import UserError
from trainer.io.atomic import copy_atomic, write_atomic
from trainer.stages.fetch import WEIGHTS_FILE, track_fetch
from trainer.stages.inputs import stage_config
from trainer.stages.prepare import track_prepare
from trainer.stages.tracking import (
    StageTracker,
    TrackingSettings,
    epoch_metrics_callback,
    run_folder,
)
from trainer.weights import checkpoints
from trainer.weights.h5layout import read_layout

SUMMARY_FILE = "summary.json"
# Checkpoints a pipeline train task keeps in its run folder: the newest two (the stage's
# final among them) plus the previous stage's final it started from. A COCO resnet101 run
# of 40+120 epochs kept ~75 GB when every epoch stayed.
PIPELINE_KEEP_LAST = 2


def run_training(config: Config, data: str | Path, *, val_data: str | Path | None = None,
                 init: str = "none", exclude: Sequence[str] = (), layers: str = "heads",
                 epochs: int, learning_rate: float = 0.0, lr_factor: float = 1.0,
                 model_dir: str | Path = "runs", augmentation=None,
                 no_augmentation_sources: Sequence[str] | None = None,
                 custom_callbacks: Sequence[keras.callbacks.Callback] | None = None,
                 verbose: int = 1, keep_last: int | None = None) -> dict:
    """One training stage, as `mrcnn train` and the pipeline run it.

    init: "none" (random initialisation), "last" (the newest checkpoint of config.NAME in
    model_dir: resumes it) or a weights path (loaded by name, `exclude` skipped; a checkpoint
    of ours continues its run and epoch count). learning_rate 0: the config's default (see
    `learning_rate_for`). keep_last: keep only the newest checkpoints of the run folder
    (None: all). Returns a JSON-ready summary.
    """
    # Every input is checked before the model is built: a bad one fails in seconds, not after
    # minutes of graph building on a GPU node (and a pipeline retry fails as fast).
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    if keep_last is not None and keep_last < 1:
        raise UserError(f"keep_last must be at least 1 (or none: keep all), got {keep_last}")
    resolve_layers(layers)
    cluster_task(config.WORKERS)
    for folder, split in ((data, "train"), (val_data, "val")):
        if folder is None:
            continue
        info = read_dataset_info(str(folder))  # ours, or Model Garden's shards
        check_classes(str(folder), info, config)
        shard_paths(str(folder), split, info)
    rate = learning_rate_for(config, learning_rate, lr_factor)
    loaded = None
    if init == "last":
        loaded = checkpoints.find_last_checkpoint(model_dir, config.NAME)
    elif init != "none":
        loaded = Path(init)
        if not loaded.is_file():
            raise UserError(f"--init {init}: no such weights file (use none, last or a path)")
        read_layout(loaded)  # a file that is not a weights file fails here, before the model
    model = MaskRCNN("training", config, model_dir=model_dir)
    if loaded is not None:
        model.load_weights(loaded, by_name=True, exclude=exclude)
        print(f"Loaded {loaded}: continuing at epoch {model.epoch}")
    start_epoch = model.epoch
    history = model.train(data, val_data, learning_rate=rate, epochs=epochs,
                          layers=layers, augmentation=augmentation,
                          custom_callbacks=custom_callbacks,
                          no_augmentation_sources=no_augmentation_sources, verbose=verbose,
                          keep_last=keep_last)
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


def resolve_init(init_dir: str | None, model_dir: Path, config: Config,
                 copy: bool = True) -> tuple[str, str]:
    """What a train task starts from, and why (for the log).

    1. Checkpoints of this task in model_dir: a retried task resumes from the newest ("last").
    2. A previous stage's checkpoint in init_dir: copied into a run folder of model_dir, so the
       epoch count continues and this stage's checkpoints land beside it, not in its input
       (copy False, for a worker that is not the chief: loaded from init_dir, the same
       weights and epoch, nothing written).
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
            if not copy:
                return str(previous), f"continuing the previous stage's {previous.name}"
            summary = json.loads((folder / SUMMARY_FILE).read_text())
            copied = model_dir / Path(summary["log_dir"]).name / previous.name
            copy_atomic(previous, copied)
            return str(copied), f"continuing the previous stage's checkpoint {previous.name}"
        if (folder / WEIGHTS_FILE).is_file():
            return str(folder / WEIGHTS_FILE), "loading the fetched weights by name"
    return "none", "random initialisation"


def stage_layers(layers: str, init: str) -> str:
    """The layers a stage trains. From random initialisation ("none") the heads stage trains
    all layers: a frozen random backbone gives the heads features nothing will keep, and
    the stage's steps are better spent on the whole network (the train-all stage then
    continues at a tenth of the rate, a step decay)."""
    return "all" if init == "none" and layers == "heads" else layers


def train_stage(*, config_preset: str, config_yaml: str, overrides: Sequence[str],
                gpu_count: int, stage: str, layers: str, epochs: int, learning_rate: float,
                lr_factor: float, dataset_dir: str, init_dir: str | None,
                exclude: Sequence[str], checkpoint_root: str, out_dir: str,
                tracking: TrackingSettings, upstream: bool = False,
                keep_last: int | None = PIPELINE_KEEP_LAST,
                custom_callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """The pipeline's train task. learning_rate 0 means LEARNING_RATE x lr_factor (matterport
    trains all layers at a tenth of the heads' rate). upstream: also record the fetch-weights
    and prepare-data stage runs from init_dir and dataset_dir (those tasks are cached and
    track nothing themselves). custom_callbacks: Keras callbacks added to training. Returns
    the last epoch's logs as `metrics` and the checkpoint's name and epoch.

    Multi-worker (WORKERS > 1 in the overrides, TF_CONFIG set by the TFJob operator): every
    worker pod calls this with the same arguments; checkpoint_root must be the same shared
    folder for all (a ReadWriteMany volume) and dataset_dir readable by all (gs://). Only the
    chief writes checkpoints (in checkpoint_root), out_dir and MLflow records; the others
    write checkpoints and TensorBoard logs to a scratch folder and return the same summary."""
    try:
        pipeline_config = stage_config(config_preset, config_yaml, overrides)
        cfg = pipeline_config.replace(GPU_COUNT=gpu_count)
        chief, failure = is_chief(cfg), None
    except UserError as err:  # recorded as the stage's failure, as any other bad input
        chief, failure = True, err
    with StageTracker(tracking, stage, enabled=chief) as tracker:
        if failure is not None:
            raise failure
        if upstream and chief:
            track_fetch(tracking, pipeline_config, init_dir or "")
            track_prepare(tracking, pipeline_config, dataset_dir)
        model_dir = run_folder(checkpoint_root, tracking.pipeline_run_id) / stage
        init, why = resolve_init(init_dir, model_dir, cfg, copy=chief)
        print(f"{stage}: {why}; checkpoints in {model_dir}", flush=True)
        if stage_layers(layers, init) != layers:
            layers = stage_layers(layers, init)
            print(f"{stage}: random initialisation: training all layers (heads on an untrained, "
                  "frozen backbone would learn nothing lasting)", flush=True)
        tracker.log_config(cfg, {"layers": layers, "epochs": epochs,
                                 "learning_rate": learning_rate_for(cfg, learning_rate,
                                                                    lr_factor),
                                 "init": init, "model_dir": str(model_dir)}, pipeline_config)
        tracker.log_dataset(dataset_dir, "training")
        loaded_exclude = list(exclude) if init.endswith(WEIGHTS_FILE) else []
        summary = run_training(cfg, dataset_dir, val_data=dataset_dir, init=init,
                               exclude=loaded_exclude, layers=layers, epochs=epochs,
                               learning_rate=learning_rate, lr_factor=lr_factor,
                               model_dir=model_dir, verbose=2, keep_last=keep_last,
                               custom_callbacks=[epoch_metrics_callback(tracker, model_dir),
                                                 *custom_callbacks])
        tracker.log_tensorboard(model_dir)  # the last epoch's events, flushed now
        if not summary["checkpoint"]:
            raise UserError(f"{stage}: no checkpoint was written (epochs={epochs} is not past "
                            f"the starting epoch {summary['start_epoch']})")
        checkpoint = Path(summary["checkpoint"])
        metrics = {k: values[-1] for k, values in summary["history"].items() if values}
        result = {"metrics": metrics, "checkpoint": checkpoint.name, "epoch": summary["epoch"]}
        if not chief:
            print(f"{stage}: not the chief: the chief's {model_dir} holds the checkpoints",
                  flush=True)
            return result
        out = Path(out_dir)
        copy_atomic(checkpoint, out / checkpoint.name)
        write_atomic(out / "config.yaml", cfg.to_yaml())
        write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True))
        tracker.log_artifact(out / SUMMARY_FILE, "checkpoint")
        tracker.log_artifact(out / checkpoint.name, "checkpoint")
        return result
