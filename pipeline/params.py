"""Pipeline parameters given as text (`--param NAME=VALUE`), typed as the compiled package
declares them: the one parser behind `mrcnn run`, `pipeline submit` and `pipeline schedule`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from trainer.config import Config
from trainer.errors import UserError

PACKAGE = Path(__file__).with_name("mask_rcnn_pipeline.yaml")


def package_parameters(package: str | Path) -> dict[str, str]:
    """The pipeline's parameters in a compiled package: name -> KFP type (STRING, ...)."""
    try:
        spec = next(yaml.safe_load_all(Path(package).read_text()))  # then the platforms
        parameters = spec["root"]["inputDefinitions"]["parameters"]
    except FileNotFoundError:
        raise UserError(f"--package {package} does not exist: run `mrcnn pipeline compile`") \
            from None
    except (yaml.YAMLError, KeyError, TypeError, StopIteration):
        raise UserError(f"--package {package} is not a compiled KFP pipeline") from None
    return {name: p["parameterType"] for name, p in parameters.items()}


def typed_value(name: str, value: str, kind: str):
    try:
        if kind == "NUMBER_INTEGER":
            return int(value)
        if kind == "NUMBER_DOUBLE":
            return float(value)
        if kind == "BOOLEAN":
            return {"true": True, "false": False}[value.lower()]
        if kind in ("LIST", "STRUCT"):
            parsed = yaml.safe_load(value)
            if not isinstance(parsed, list if kind == "LIST" else dict):
                raise ValueError
            return parsed
    except (ValueError, KeyError, yaml.YAMLError):
        raise UserError(f"parameter {name}: {value!r} is not a {kind.lower()}") from None
    return value


def parse_params(assignments: Sequence[str], package: str | Path = PACKAGE) -> dict:
    """`["heads_epochs=2", "weights_exclude=[mrcnn_mask]"]` -> typed pipeline arguments (lists
    and structs are YAML)."""
    kinds = package_parameters(package)
    arguments: dict = {}
    for text in assignments:
        name, sep, value = text.partition("=")
        if not sep or name not in kinds:
            raise UserError(f"--param {text!r}: expected NAME=VALUE with NAME one of "
                            f"{', '.join(kinds)}")
        arguments[name] = typed_value(name, value, kinds[name])
    return arguments


def with_local_preset(arguments: dict) -> dict:
    """`arguments` with config_yaml set to the resolved text of config_preset when that preset
    exists here, so the tasks need no copy of it (a path inside the image is sent as it is,
    for the tasks to read there)."""
    preset = Path(str(arguments.get("config_preset", "")))
    if preset.suffix in (".yaml", ".yml") and preset.is_file() and not arguments.get(
            "config_yaml"):
        return {**arguments, "config_yaml": Config.from_yaml(preset).to_yaml()}
    return arguments
