"""Write the option table of the pinned vLLM's `vllm serve` parser to a JSON file.

Run it with the interpreter of an environment that has the pinned vLLM installed (vLLM
brings its own torch and CUDA packages, so it never goes into rlspec's `.venv`; `make
vllm-table` builds `.venv-vllm` and runs this)::

    VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python tools/vllm_serve_options.py OUT.json

The parser is vLLM's own (`make_arg_parser` on a `FlexibleArgumentParser`, what `vllm
serve` builds); without a GPU it builds only with ``VLLM_TARGET_DEVICE=cpu``. Per option
string the table records whether it takes a value, and what the parser itself checks of
the value: ``choices`` (for ``--quantization``, vLLM's list of methods, which it checks
after parsing) and an ``int``/``float`` type. `tests/vllm_flags` checks every flag a
rendered bundle passes to `vllm serve` against this table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _type_name(kind: Any) -> str | None:
    """int/float/str for plain and Optional-wrapped types; None for anything else."""
    if kind in (int, float, str):
        return kind.__name__
    for cell in getattr(kind, "__closure__", None) or ():  # vLLM's optional_type(int)
        inner = cell.cell_contents
        if inner in (int, float, str):
            return inner.__name__
    return None


def option_table() -> dict[str, Any]:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import vllm
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    # Values vLLM checks after parsing rather than in the parser, where it lists them.
    later_checked = {"quantization": sorted(QUANTIZATION_METHODS)}
    options: dict[str, Any] = {}
    for action in parser._actions:  # the parser's own record of every option
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        entry = {
            "dest": action.dest,
            "takes_value": action.nargs != 0,
            "nargs": action.nargs if isinstance(action.nargs, (int, str)) else None,
            "type": _type_name(action.type),
            "choices": (sorted(str(c) for c in action.choices) if action.choices
                        else later_checked.get(action.dest)),
            "aliases": sorted(action.option_strings),
        }
        for flag in action.option_strings:
            options[flag] = entry
    return {"vllm_version": vllm.__version__, "command": "vllm serve",
            "options": dict(sorted(options.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("out", type=Path, help="the JSON file to write")
    args = ap.parse_args(argv)
    table = option_table()
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"vllm {table['vllm_version']}: {len(table['options'])} option strings -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
