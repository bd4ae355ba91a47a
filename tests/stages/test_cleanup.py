"""clean-checkpoints: the run's folder goes once evaluate has succeeded, and nothing else."""

from trainer.stages.cleanup import clean_checkpoints_stage
from trainer.stages.tracking import TrackingSettings, run_folder


def fill(folder, files):
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)


def test_the_runs_folder_is_removed_and_other_runs_stay(tmp_path):
    mine, other = run_folder(tmp_path, "run/1"), run_folder(tmp_path, "run-2")
    fill(mine, {"train-heads/demo20261202T1200/mask_rcnn_demo_0001.h5": 1000,
                "train-all/demo20261202T1210/mask_rcnn_demo_0002.h5": 500})
    fill(other, {"train-all/x.h5": 10})
    (tmp_path / ".run-0.removing-abcd").mkdir()  # an earlier cleanup killed halfway
    result = clean_checkpoints_stage(checkpoint_root=str(tmp_path), keep=False,
                                     tracking=TrackingSettings(pipeline_run_id="run/1"))
    assert result == {"folder": str(mine), "removed": True, "bytes": 1500}
    assert not mine.exists()
    assert (other / "train-all" / "x.h5").read_bytes() == b"x" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-2"]


def test_keep_or_a_missing_folder_removes_nothing(tmp_path):
    mine = run_folder(tmp_path, "run-1")
    fill(mine, {"train-all/a.h5": 3})
    kept = clean_checkpoints_stage(checkpoint_root=str(tmp_path), keep=True,
                                   tracking=TrackingSettings(pipeline_run_id="run-1"))
    assert kept["removed"] is False and (mine / "train-all" / "a.h5").exists()
    missing = clean_checkpoints_stage(checkpoint_root=str(tmp_path), keep=False,
                                      tracking=TrackingSettings(pipeline_run_id="run-9"))
    assert missing == {"folder": str(run_folder(tmp_path, "run-9")), "removed": False,
                       "bytes": 0}
    assert (mine / "train-all" / "a.h5").exists()


def test_a_symlinked_run_folder_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    fill(outside, {"precious.h5": 5})
    (tmp_path / "root").mkdir()
    run_folder(tmp_path / "root", "run-1").symlink_to(outside, target_is_directory=True)
    result = clean_checkpoints_stage(checkpoint_root=str(tmp_path / "root"), keep=False,
                                     tracking=TrackingSettings(pipeline_run_id="run-1"))
    assert result["removed"] is False
    assert (outside / "precious.h5").exists()
