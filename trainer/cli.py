"""`mrcnn`: the command line. Thin: it parses arguments and calls one library function each.

Every command exits non-zero with a one-line reason on bad input (`UserError` and its kin),
prints progress for long work, and writes JSON where asked with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from trainer.errors import UserError

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# === Commands ===
# Each `_add_*` function registers one subcommand; its handler imports the library lazily so
# that `mrcnn --help` stays fast and a command never pays for another's imports.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrcnn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands)
    return parser


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"mrcnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mrcnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
