"""Checkpoint layout: matterport's run folders and file names, plus the optimizer state.

    {model_dir}/{name}{YYYYmmddTHHMM}/mask_rcnn_{name}_{epoch:04d}.h5          weights (Keras-2 h5)
    {model_dir}/{name}{YYYYmmddTHHMM}/mask_rcnn_{name}_{epoch:04d}.optimizer.npz  SGD state

The optimizer state lets a resumed run continue exactly: iteration count, learning rate and
every momentum slot, keyed by variable path, with the trainable set it belongs to.
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from trainer.errors import UserError

RUN_FOLDER = re.compile(r"^(?P<name>.*?)(?P<stamp>\d{8}T\d{4})$")
CHECKPOINT = re.compile(r"^mask_rcnn_(?P<name>.*)_(?P<epoch>\d{4,})\.h5$")
OPTIMIZER_SUFFIX = ".optimizer.npz"


def run_folder(model_dir: str | Path, name: str, now: datetime.datetime | None = None) -> Path:
    """A new run folder path `{model_dir}/{name}{YYYYmmddTHHMM}` (not created)."""
    now = now or datetime.datetime.now()
    return Path(model_dir) / f"{name.lower()}{now:%Y%m%dT%H%M}"


def checkpoint_path(log_dir: str | Path, name: str, epoch: int) -> Path:
    return Path(log_dir) / f"mask_rcnn_{name.lower()}_{epoch:04d}.h5"


def optimizer_path(weights_path: str | Path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name[: -len(".h5")] + OPTIMIZER_SUFFIX)


def epoch_of(path: str | Path) -> int | None:
    """The epoch in a checkpoint file name (`..._0003.h5` -> 3), or None for other names."""
    match = CHECKPOINT.match(Path(path).name)
    return int(match["epoch"]) if match else None


def find_last_checkpoint(model_dir: str | Path, name: str | None = None) -> Path:
    """The newest checkpoint under `model_dir` (matterport's `find_last`, made robust).

    Looks through every run folder `{name}{YYYYmmddTHHMM}`, newest stamp first, and returns the
    highest-epoch `mask_rcnn_{name}_{epoch:04d}.h5` of the first folder that has one: a new,
    empty run folder (a run that died before its first epoch) does not hide older ones.
    `name` (lower-case NAME) limits the search to one config's runs.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model dir {model_dir} is not a folder: train first, or pass a "
                        "weights path")
    runs = []
    for folder in model_dir.iterdir():
        match = RUN_FOLDER.match(folder.name)
        if folder.is_dir() and match and (name is None or match["name"] == name.lower()):
            runs.append((match["stamp"], folder.name, folder))
    for _, _, folder in sorted(runs, reverse=True):
        checkpoints = []
        for path in folder.iterdir():
            match = CHECKPOINT.match(path.name)
            if path.is_file() and match and (name is None or match["name"] == name.lower()):
                checkpoints.append((int(match["epoch"]), path))
        if checkpoints:
            return max(checkpoints)[1]
    which = f"'{name.lower()}' " if name else ""
    raise UserError(f"no {which}checkpoint (<run folder>/mask_rcnn_<name>_<epoch>.h5) under "
                    f"{model_dir}: train first, or pass a weights path")


def save_optimizer_state(path: Path, optimizer, variables, names: list[str],
                         extra: dict | None = None) -> None:
    """Writes `optimizer`'s state for `variables` (the trainable ones) atomically.

    names: a stable name per variable (matterport's weight names: Keras' own variable paths
    change with every model built in a process). Stored: the iteration count, the learning
    rate, the names, and each optimizer slot (momentum) in the same order; `extra` beside.
    """
    arrays: dict[str, np.ndarray] = {
        "iterations": np.asarray(int(optimizer.iterations.numpy())),
        "learning_rate": np.asarray(float(np.asarray(optimizer.learning_rate))),
        "variable_names": np.asarray(names),
    }
    for i, slot in enumerate(_slots(optimizer, variables)):
        arrays[f"slot_{i:05d}"] = slot.numpy()
    for key, value in (extra or {}).items():
        arrays[f"extra_{key}"] = np.asarray(value)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_optimizer_state(path: Path, optimizer, variables, names: list[str]) -> bool:
    """Restores a state saved by `save_optimizer_state` into a built optimizer.

    Returns False (and changes nothing) when the file is missing or belongs to another
    trainable set (e.g. the heads stage's state when training all layers), as a new stage
    starts a new optimizer in matterport too.
    """
    if not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as state:
        if [str(n) for n in state["variable_names"]] != list(names):
            return False
        slots = _slots(optimizer, variables)
        saved = [state[f"slot_{i:05d}"] for i in range(len(slots))]
        if any(tuple(s.shape) != a.shape for s, a in zip(slots, saved, strict=True)):
            return False
        for slot, value in zip(slots, saved, strict=True):
            slot.assign(value)
        optimizer.iterations.assign(int(state["iterations"]))
    return True


def _slots(optimizer, variables) -> list:
    """The optimizer's per-variable slots (SGD: momentum; Adam, AdamW: first and second
    moments), in `variables` order."""
    kinds = [getattr(optimizer, name, None) for name in ("momentums", "_momentums",
                                                          "_velocities")]
    return [slots[optimizer._get_variable_index(v)] for slots in kinds if slots
            for v in variables]
