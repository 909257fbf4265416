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

Under ``weight_transfer`` it also records what `runtime.rollout.weight_transfer` and the
`--weight-transfer-config` value depend on, from the same installed vLLM: the fields of
`WeightTransferConfig`, the backends registered with the worker- and trainer-side
factories, the fields of the NCCL and IPC init / update-info dataclasses (type, required),
the RL routes (`vllm/entrypoints/rl/online/api_router.py`, plus the dev `/collective_rpc`)
and the parameters of the workers' `reload_weights` (the path reload).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
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


def _type_text(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _dataclass_fields(cls: Any) -> dict[str, Any]:
    return {f.name: {"type": _type_text(f.type),
                     "required": (f.default is dataclasses.MISSING
                                  and f.default_factory is dataclasses.MISSING)}
            for f in dataclasses.fields(cls)}


def weight_transfer_facts() -> dict[str, Any]:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCWeightTransferInitInfo,
        IPCWeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
    )
    from vllm.entrypoints.rl.online.api_router import router as rl_router
    from vllm.entrypoints.serve.dev.rpc.api_router import router as rpc_router
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    routes = {r.path: sorted(r.methods) for router in (rl_router, rpc_router)
              for r in router.routes}
    # The workers' reload_weights(*args, **kwargs) forwards to this function after
    # (vllm_config, model).
    reload_params = [p for p in inspect.signature(reload_weights).parameters
                     if p not in ("vllm_config", "model")]
    return {
        "config_option": "--weight-transfer-config",
        "config_fields": _dataclass_fields(WeightTransferConfig),
        # The worker side (what `backend` must name) and the trainer side.
        "backends": sorted(WeightTransferEngineFactory._registry),
        "trainer_backends": sorted(WeightTransferTrainerFactory._registry),
        "init_info": {"nccl": _dataclass_fields(NCCLWeightTransferInitInfo),
                      "ipc": _dataclass_fields(IPCWeightTransferInitInfo)},
        "update_info": {"nccl": _dataclass_fields(NCCLWeightTransferUpdateInfo),
                        "ipc": _dataclass_fields(IPCWeightTransferUpdateInfo)},
        "routes": dict(sorted(routes.items())),
        "reload_weights_params": reload_params,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("out", type=Path, help="the JSON file to write")
    args = ap.parse_args(argv)
    table = option_table()
    table["weight_transfer"] = weight_transfer_facts()
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"vllm {table['vllm_version']}: {len(table['options'])} option strings -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
