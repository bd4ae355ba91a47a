"""clean-checkpoints: removes the run's checkpoint folder from the volume after evaluate."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def clean_checkpoints(checkpoint_root: str, keep_checkpoints: bool, metrics: Output[Metrics]):
    """Removes {checkpoint_root}/{run key} (every stage's epochs) unless keep_checkpoints;
    metrics: checkpoint_bytes_removed."""
    from trainer.stages.cleanup import clean_checkpoints_stage
    from trainer.stages.tracking import TrackingSettings

    result = clean_checkpoints_stage(checkpoint_root=checkpoint_root, keep=keep_checkpoints,
                                     tracking=TrackingSettings.from_env())
    metrics.log_metric("checkpoint_bytes_removed", float(result["bytes"]))
