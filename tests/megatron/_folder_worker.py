"""One rank of an HF-folder round trip (tests/megatron/test_mcore_hf_folder.py): ``python -m
tests.megatron._folder_worker RANK WORLD_SIZE TP EP PP WORKDIR [KEY=VALUE ...]`` (options:
``tests.megatron._train_worker.LAYOUT``).

Rank 0 first writes the tiny HF policy of the family with ``save_policy`` to WORKDIR/ref (with
``dtype=bfloat16``: as ``from_pretrained`` loads it in that dtype).
Every rank then builds two Megatron models of the layout: A takes the in-memory HF weights
(``load_hf_weights``), B reads WORKDIR/ref (``load_hf_folder``); A is written back with
``save_hf_folder`` to WORKDIR/out, one unit per file. WORKDIR/rank{RANK}.pt holds the names of
the parameters where B differs from A and the bytes the rank held while writing.
Rendezvous: ``file://WORKDIR/rendezvous`` over gloo (loopback only).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def run(rank: int, world_size: int, tp: int, ep: int, pp: int, workdir: Path,
        options: dict[str, Any] | None = None) -> dict[str, Any]:
    from runtime.megatron.cpu import enable_cpu

    enable_cpu()
    from runtime.megatron.hf_folder import load_hf_folder, save_hf_folder
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_chunks, model_chunks
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.policy import build_tokenizer, save_policy
    from tests.megatron._train_worker import LAYOUT, _layout, policy

    opts = {**LAYOUT, **(options or {})}
    layout, stages, layers = _layout(tp, ep, pp, {k: v for k, v in opts.items()
                                                  if k not in ("fail", "slow")})
    hf = policy(opts["family"], layers=layers, tie=bool(int(opts["tie"])))
    tokenizer = build_tokenizer(int(hf.config.vocab_size))
    dtype = getattr(torch, opts["dtype"])
    if rank == 0:
        save_policy(hf, tokenizer, workdir / "ref", step=3)
        if dtype != torch.float32:  # what from_pretrained makes of it in that dtype
            from runtime.policy import load_policy

            save_policy(load_policy(workdir / "ref", dtype=dtype)[0], tokenizer, workdir / "ref",
                        step=3)
    pg = init_parallel(rank, world_size, workdir / "rendezvous", **layout)
    try:
        torch.distributed.barrier()  # the reference folder is written

        def build() -> Any:
            return build_gpt_chunks(hf.config, pg, **layout, **stages, sequence_parallel=tp > 1,
                                    dtype=dtype)

        a, b = build(), build()
        load_hf_weights(a, hf.state_dict(), hf.config)
        load_hf_folder(b, hf.config, workdir / "ref")
        differ = [f"{i}:{name}" for i, (ca, cb) in enumerate(zip(model_chunks(a), model_chunks(b),
                                                                  strict=True))
                  for (name, pa), (_, pb) in zip(ca.state_dict().items(), cb.state_dict().items(),
                                                 strict=True)
                  if isinstance(pa, torch.Tensor) and not torch.equal(pa, pb)]
        fail = opts.get("fail")
        if fail == str(rank):  # this rank's disk fills up as it writes
            import runtime.megatron.hf_folder as hf_folder

            def full(*args: Any) -> None:
                raise OSError(28, "No space left on device")

            hf_folder._Shards.add = full  # type: ignore[method-assign]
        if fail == "rename" and rank == 0:  # the folder cannot be renamed into place
            import os

            rename = os.rename

            def refuse(src: Any, dst: Any) -> None:
                if Path(dst) == workdir / "out":
                    raise OSError(30, "Read-only file system")
                rename(src, dst)

            os.rename = refuse  # type: ignore[assignment]
        if opts.get("slow") is not None:  # the default group times out after 2 s meanwhile
            import datetime
            import time

            import runtime.megatron.hf_folder as hf_folder

            torch.distributed.barrier()
            default = torch.distributed.distributed_c10d._get_default_group()
            default._get_backend(torch.device("cpu")).set_timeout(datetime.timedelta(seconds=2))
            if opts["slow"] == str(rank):  # this rank's disk is slow: it writes for 5 s
                flush = hf_folder._Shards.flush

                def slow(self: Any) -> None:
                    time.sleep(5.0)
                    flush(self)

                hf_folder._Shards.flush = slow  # type: ignore[method-assign]
        try:
            held = save_hf_folder(a, hf.config, tokenizer, workdir / "out", shard_bytes=1,
                                  step=3)
        except (RuntimeError, OSError) as exc:
            return {"differ": differ, "error": str(exc)}
        return {"differ": differ, "held": held}
    finally:
        destroy_parallel()


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    rank, world_size, tp, ep, pp = (int(a) for a in argv[:5])
    workdir = Path(argv[5])
    # and fail=RANK: that rank's writes fail; fail=rename: rank 0's rename into place fails;
    # slow=RANK: that rank's writes take longer than the default group's timeout
    options = dict(a.split("=", 1) for a in argv[6:])
    torch.set_num_threads(1)
    torch.save(run(rank, world_size, tp, ep, pp, workdir, options), workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
