"""Checkpoint layout: matterport's run folders and file names, plus the optimizer state.

    {model_dir}/{name}{YYYYmmddTHHMM}/mask_rcnn_{name}_{epoch:04d}.h5          weights (Keras-2 h5)
    {model_dir}/{name}{YYYYmmddTHHMM}/mask_rcnn_{name}_{epoch:04d}.optimizer.npz  SGD state

The optimizer state lets a resumed run continue exactly: iteration count, learning rate and
every momentum slot, keyed by variable path, with the trainable set it belongs to. It is
written before its weights file, so a weights file never exists without its state.

A run folder is created exclusively: a second run started in the same minute gets
`{name}{YYYYmmddTHHMM}_2` (then `_3`, ...), which sorts after the first one.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from trainer.errors import UserError, WeightsFileError
from trainer.io.atomic import atomic_file, remove_temporaries
from trainer.weights.h5layout import read_layout

log = logging.getLogger(__name__)

RUN_FOLDER = re.compile(r"^(?P<name>.*?)(?P<stamp>\d{8}T\d{4})(?:_(?P<seq>[1-9]\d*))?$")
CHECKPOINT = re.compile(r"^mask_rcnn_(?P<name>.*)_(?P<epoch>\d{4,})\.h5$")
OPTIMIZER_SUFFIX = ".optimizer.npz"
OPTIMIZER_FILE = re.compile(r"^mask_rcnn_(?P<name>.*)_(?P<epoch>\d{4,})\.optimizer\.npz$")


def run_folder(model_dir: str | Path, name: str, now: datetime.datetime | None = None) -> Path:
    """A new run folder path `{model_dir}/{name}{YYYYmmddTHHMM}` (not created)."""
    now = now or datetime.datetime.now()
    return Path(model_dir) / f"{name.lower()}{now:%Y%m%dT%H%M}"


def create_run_folder(model_dir: str | Path, name: str,
                      now: datetime.datetime | None = None) -> Path:
    """Creates and returns a run folder no other run uses: `{name}{YYYYmmddTHHMM}`, or with
    `_2`, `_3`, ... appended when runs started in the same minute took the earlier ones
    (`os.mkdir` is atomic: of two runs racing for a name, exactly one gets it)."""
    first = run_folder(model_dir, name, now)
    try:
        first.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the model dir {first.parent}: {err.strerror}") from err
    for seq in itertools.count(1):
        folder = first if seq == 1 else first.with_name(f"{first.name}_{seq}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def run_order(folder_name: str) -> tuple[str, int] | None:
    """How run folders sort, oldest first: by stamp, then by the same-minute suffix (none
    is 1); None for a name that is not a run folder."""
    match = RUN_FOLDER.match(folder_name)
    return (match["stamp"], int(match["seq"] or 1)) if match else None


def checkpoint_path(log_dir: str | Path, name: str, epoch: int) -> Path:
    return Path(log_dir) / f"mask_rcnn_{name.lower()}_{epoch:04d}.h5"


def optimizer_path(weights_path: str | Path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name[: -len(".h5")] + OPTIMIZER_SUFFIX)


def epoch_of(path: str | Path) -> int | None:
    """The epoch in a checkpoint file name (`..._0003.h5` -> 3), or None for other names."""
    match = CHECKPOINT.match(Path(path).name)
    return int(match["epoch"]) if match else None


def checkpoints_in_folder(folder: str | Path, name: str | None = None) -> list[Path]:
    """The checkpoints `mask_rcnn_{name}_{epoch:04d}.h5` directly in `folder` (any name when
    `name` is None), highest epoch first."""
    found = []
    for path in Path(folder).iterdir():
        match = CHECKPOINT.match(path.name)
        if path.is_file() and match and (name is None or match["name"] == name.lower()):
            found.append((int(match["epoch"]), path))
    return [path for _, path in sorted(found, reverse=True)]


def newest_in_folder(folder: str | Path, name: str | None = None) -> Path | None:
    """The highest-epoch checkpoint `mask_rcnn_{name}_{epoch:04d}.h5` directly in `folder`
    (any name when `name` is None), or None when it holds none."""
    return next(iter(checkpoints_in_folder(folder, name)), None)


def unreadable_reason(path: str | Path) -> str | None:
    """Why the checkpoint `path` cannot be resumed from (its weights file, or the optimizer
    state beside it, is truncated or corrupt), or None when it can. Reads metadata only."""
    try:
        read_layout(path)
    except WeightsFileError as err:
        return str(err)
    state = optimizer_path(path)
    if state.exists():
        try:
            with np.load(state, allow_pickle=False) as arrays:
                arrays["variable_names"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            return f"its optimizer state {state.name} is unreadable ({err})"
    return None


def _candidates(model_dir: Path, name: str | None) -> Iterator[Path]:
    """Every checkpoint under `model_dir`: run folders newest first, epochs newest first."""
    runs = []
    for folder in model_dir.iterdir():
        match = RUN_FOLDER.match(folder.name)
        if folder.is_dir() and match and (name is None or match["name"] == name.lower()):
            runs.append((run_order(folder.name), folder.name, folder))
    for _, _, folder in sorted(runs, reverse=True):
        yield from checkpoints_in_folder(folder, name)


def find_last_checkpoint(model_dir: str | Path, name: str | None = None) -> Path:
    """The newest readable checkpoint under `model_dir` (matterport's `find_last`, made robust).

    Looks through every run folder `{name}{YYYYmmddTHHMM}[_N]`, newest first, and returns
    the highest-epoch `mask_rcnn_{name}_{epoch:04d}.h5` of the first folder that has one: a
    new, empty run folder (a run that died before its first epoch) does not hide older ones.
    A checkpoint that cannot be read (truncated or corrupt weights or optimizer state) is
    skipped with a warning, and the one before it is taken. `name` (lower-case NAME) limits
    the search to one config's runs.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model dir {model_dir} is not a folder: train first, or pass a "
                        "weights path")
    for path in _candidates(model_dir, name):
        reason = unreadable_reason(path)
        if reason is None:
            return path
        log.warning("skipping unreadable checkpoint %s: %s", path, reason)
    which = f"'{name.lower()}' " if name else ""
    raise UserError(f"no {which}checkpoint (<run folder>/mask_rcnn_<name>_<epoch>.h5) under "
                    f"{model_dir}: train first, or pass a weights path")


def remove_leftovers(log_dir: str | Path, name: str) -> list[Path]:
    """Deletes what interrupted checkpoint writes left in a run folder: temporary files of
    `mask_rcnn_{name}_*` and optimizer states whose weights file was never committed (the
    state is written first). Returns what was deleted. Only for the run's own folder."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return []
    removed = remove_temporaries(log_dir, rf"mask_rcnn_{re.escape(name.lower())}_.*")
    for path in log_dir.iterdir():
        match = OPTIMIZER_FILE.match(path.name)
        if match and match["name"] == name.lower() and \
                not checkpoint_path(log_dir, name, int(match["epoch"])).exists():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def prune_checkpoints(log_dir: str | Path, name: str, keep_last: int,
                      protected: Iterable[str | Path] = ()) -> list[Path]:
    """Deletes all but the `keep_last` newest checkpoints of `name` in `log_dir` (weights
    first, then their optimizer state), never one in `protected`. Returns what was deleted."""
    if keep_last < 1:
        raise UserError(f"keep_last must be at least 1 (the newest checkpoint), got {keep_last}")
    keep = {Path(p).resolve() for p in protected}
    removed = []
    for path in checkpoints_in_folder(log_dir, name)[keep_last:]:
        if path.resolve() in keep:
            continue
        path.unlink(missing_ok=True)
        optimizer_path(path).unlink(missing_ok=True)
        removed.append(path)
    return removed


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
    with atomic_file(path) as handle:
        np.savez(handle, **arrays)


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
    moments), in `variables` order; a loss-scaling wrapper's are its inner optimizer's."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    kinds = [getattr(optimizer, name, None) for name in ("momentums", "_momentums",
                                                          "_velocities")]
    return [slots[optimizer._get_variable_index(v)] for slots in kinds if slots
            for v in variables]
