"""What every `mrcnn` command shares: the --config/--set arguments, the config they load,
and --json output."""

from __future__ import annotations

import argparse
import json
import sys


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--config PRESET and repeatable --set KEY=VALUE, the same on every command."""
    parser.add_argument("--config", required=required,
                        help="YAML preset, e.g. configs/demo.yaml"
                        + ("" if required else " (default: matterport's defaults)"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable)")


def load_config(args: argparse.Namespace):
    from trainer.config import Config  # lazy, as every handler's: `mrcnn --help` stays fast

    if args.config:
        return Config.from_yaml(args.config, args.overrides)
    return Config().with_overrides(args.overrides)
