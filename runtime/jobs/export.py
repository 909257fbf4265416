"""Job ``export``: the final policy as an HF checkpoint in ``spec.export.dtype``.

Copies the HF folder of input ``policy_final`` into output ``export`` (atomically, with a
``.complete`` marker): every ``*.safetensors`` file is rewritten with its floating-point
tensors cast to ``spec.export.dtype`` (``bf16`` → bfloat16, ``fp16`` → float16, ``fp32`` →
float32; integer tensors unchanged), ``config.json`` gets the matching ``dtype`` /
``torch_dtype``, a sharded checkpoint's index its new ``total_size``, and every other file
(tokenizer files, generation_config.json, …) is copied as is. The input's own
``.complete`` marker is not copied; the export gets its own. Only ``format: hf`` and
safetensors weights are supported.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.jobs.common import COMPLETE_MARKER, JobContext, JobError, run_job, single_output

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def convert_checkpoint(src: Path, dst: Path, dtype_name: str) -> dict[str, int]:
    """Copy the HF folder ``src`` into the existing folder ``dst`` with weights cast to
    ``dtype_name`` (a key of ``DTYPES``); returns {"tensors": n, "bytes": total}."""
    import torch
    from safetensors.torch import load_file, save_file

    try:
        target = getattr(torch, DTYPES[dtype_name])
    except KeyError:
        raise JobError(f"unsupported export dtype {dtype_name!r}; known: {sorted(DTYPES)}") from None
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        if any(src.glob("*.bin")):
            raise JobError(f"{src} holds .bin weights; export converts safetensors only")
        raise JobError(f"no *.safetensors weights in {src}")
    tensors = total = 0
    for item in sorted(src.iterdir()):
        if item.name == COMPLETE_MARKER or item.suffix == ".safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    for path in weights:
        state = load_file(str(path))
        out = {name: (t.to(target) if t.is_floating_point() else t).contiguous()
               for name, t in state.items()}
        tensors += len(out)
        total += sum(t.numel() * t.element_size() for t in out.values())
        save_file(out, str(dst / path.name), metadata={"format": "pt"})
    config = dst / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        cfg["dtype"] = cfg["torch_dtype"] = DTYPES[dtype_name]
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text(encoding="utf-8"))
        idx.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(idx, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"tensors": tensors, "bytes": total}


def run(ctx: JobContext) -> None:
    export = ctx.model_spec.export
    if export is None:
        raise JobError("spec.export is null: this spec exports nothing")
    fmt, dtype = export.format, export.dtype
    if fmt != "hf":
        raise JobError(f"export format {fmt!r} is not supported (only hf)")
    if dtype not in DTYPES:
        raise JobError(f"unsupported export dtype {dtype!r}; known: {sorted(DTYPES)}")
    src = ctx.input_path("policy_final")
    if not (src / "config.json").is_file():
        raise JobError(f"no HF checkpoint at {src} (config.json missing)")
    if ctx.rank != 0:
        return
    out_name = "export" if "export" in ctx.outputs else single_output(ctx)
    with ctx.atomic_output(out_name, dtype=dtype, source=str(src)) as tmp:
        info = convert_checkpoint(src, tmp, dtype)
    ctx.log.info("exported %s as %s: %d tensors, %.1f MB, to %s", src, dtype, info["tensors"],
                 info["bytes"] / 1e6, ctx.output_path(out_name))


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
