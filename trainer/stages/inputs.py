"""What every stage receives: the pipeline's config, given explicitly as a preset path inside
the image or as YAML text (two parameters, never a guess from the content), plus overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainer.config import Config
from trainer.errors import UserError

IMAGE_CONFIG_DIR = Path("/app")  # where the image keeps configs/ (Dockerfile)


def stage_config(preset: str, yaml_text: str, overrides: Sequence[str] = ()) -> Config:
    """The config a stage runs with: `yaml_text` when given (what `mrcnn run` and `pipeline
    submit` send for a local preset), else the preset at `preset` (relative to the working
    folder, then to the image's /app); `overrides` (KEY=VALUE) on top."""
    if yaml_text.strip():
        return Config.from_text(yaml_text, overrides, source="config_yaml")
    if not preset:
        raise UserError("no config: set the pipeline parameter config_preset (a preset path in "
                        "the image, e.g. configs/coco.yaml) or config_yaml (YAML text)")
    path = Path(preset)
    if not path.is_file() and not path.is_absolute() and (IMAGE_CONFIG_DIR / path).is_file():
        path = IMAGE_CONFIG_DIR / path
    return Config.from_yaml(path, overrides)


def task_inputs(preset: str, yaml_text: str, overrides: Sequence[str] = ()) -> dict:
    """What the cached tasks get of the config: the model-shape keys (fetch-weights) and the
    image size of generated shapes (prepare-data). Training settings and MLflow settings are
    not among them, so changing those keeps both tasks' cache keys."""
    config = stage_config(preset, yaml_text, overrides)
    return {"model_config": config.model_shape_yaml(), "image_size": int(config.IMAGE_SHAPE[0])}
