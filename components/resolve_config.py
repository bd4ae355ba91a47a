"""resolve-config: the parts of the config the cached tasks use, so their cache keys hold only
what decides their results (changing LEARNING_RATE or the MLflow experiment reuses them)."""

from typing import NamedTuple

from kfp import dsl

from trainer.version import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_config(config_preset: str, config_yaml: str, config_overrides: list
                   ) -> NamedTuple("TaskInputs", [("model_config", str), ("image_size", int)]):
    """model_config: the model-shape keys as YAML (for fetch-weights); image_size: the side
    of generated shapes (for prepare-data)."""
    from collections import namedtuple

    from trainer.stages.inputs import task_inputs

    inputs = task_inputs(config_preset, config_yaml, config_overrides)
    return namedtuple("TaskInputs", ["model_config", "image_size"])(
        inputs["model_config"], inputs["image_size"])
