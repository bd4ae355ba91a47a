"""The pipeline's last task: a run's checkpoint folder removed from the volume once evaluate
has succeeded. Every stage's final checkpoint is already a task artifact (and in MLflow), so
what goes is the intermediate epochs a retried task would have resumed from; a scheduled
run that kept them would fill the volume within a few runs."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from trainer.stages.tracking import TrackingSettings, run_folder

# A folder being removed is first renamed to this, so a task killed halfway leaves nothing
# that looks like a run's checkpoints; the next cleanup removes such leftovers.
REMOVING = ".removing-"


def clean_checkpoints_stage(*, checkpoint_root: str, keep: bool,
                            tracking: TrackingSettings) -> dict:
    """Removes `{checkpoint_root}/{run key}` (the folder train_stage wrote) unless `keep`.
    Returns {"folder", "removed", "bytes"}: bytes freed, 0 when nothing was removed."""
    folder = run_folder(checkpoint_root, tracking.pipeline_run_id)
    result = {"folder": str(folder), "removed": False, "bytes": 0}
    if keep:
        print(f"cleanup: keep_checkpoints is set: {folder} stays", flush=True)
        return result
    for leftover in Path(checkpoint_root).glob(f".*{REMOVING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if folder.is_symlink() or not folder.is_dir():
        print(f"cleanup: no checkpoint folder {folder} (nothing to remove: the run key "
              f"{tracking.pipeline_run_id!r} names no folder on this volume)", flush=True)
        return result
    size = sum(path.stat().st_size for path in folder.rglob("*")
               if path.is_file() and not path.is_symlink())
    trash = folder.parent / f".{folder.name}{REMOVING}{secrets.token_hex(4)}"
    os.rename(folder, trash)
    shutil.rmtree(trash)
    print(f"cleanup: removed {folder} ({size / 1e9:.2f} GB); each stage's final checkpoint "
          "is its task's model artifact", flush=True)
    return {**result, "removed": True, "bytes": size}
