"""The `rlspec` console script.

`validate` and `compile` run on login nodes, often in loops and CI hooks, so they skip the
CLI framework: a small argparse front calls the same command bodies the typer app does
(`compiler.commands`). Anything else, `--help`, or arguments argparse does not take go to the
typer app (`compiler.cli`), which owns the documented interface.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAST = ("validate", "compile")


class _Fallback(Exception):
    """argparse wants to print an error or help: let typer do it, with its messages."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _Fallback(message)


def _fast(argv: list[str]) -> int | None:
    if not argv or argv[0] not in FAST or {"-h", "--help"} & set(argv):
        return None
    parser = _Parser(add_help=False)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    if argv[0] == "compile":
        # a string: Path("") would be ".", and an empty -o is refused, not the cwd
        parser.add_argument("-o", "--output", required=True)
        parser.add_argument("--force", action="store_true")
        parser.add_argument("--no-force", dest="force", action="store_false")
    try:
        args = parser.parse_args(argv[1:])
    except _Fallback:
        return None
    from compiler import commands

    if argv[0] == "validate":
        return commands.validate_command(args.spec, args.overrides)
    return commands.compile_command(args.spec, args.output, args.overrides, args.force)


def main() -> None:
    code = _fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from compiler.cli import app

    app()


if __name__ == "__main__":
    main()
