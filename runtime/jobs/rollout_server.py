"""The RL job's embedded rollout engine: ``runtime.rollout.server`` on the job's policy.

``jobs/rl/rollout.sh`` runs ``python -m runtime.jobs.rollout_server --config ... --model DIR
--host HOST --port P [--return-routed-experts] [--enable-sleep-mode]
[--weight-transfer-config JSON]``. This wrapper

* serves port + ``LOCAL_RANK`` (``runtime.launch`` starts one wrapper per replica when a
  node holds several),
* refuses a host that is not loopback when the run is local (no Slurm allocation),
* serves with one torch thread and dies with its parent (no orphan engine when the
  launch script is stopped),
* takes the engine's numerics from the job's typed config: ``rollout.fp8`` serves with
  ``--quantization fp8`` (FP8-rounded weights, ``runtime.rollout.fp8``), as ``vllm serve``
  does in the same job,

then hands over to ``runtime.rollout.server.main``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_argv(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> list[str]:
    """The ``runtime.rollout.server`` command line for this wrapper's arguments."""
    env = dict(os.environ if env is None else env)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--config", default=None,
                    help="the job's config.json (its rollout.fp8 selects --quantization fp8)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--return-routed-experts", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--enable-sleep-mode", action="store_true")
    ap.add_argument("--weight-transfer-config", default=None)
    args = ap.parse_args(argv)
    port = args.port + int(env.get("LOCAL_RANK") or 0)
    out = ["--model", args.model, "--host", args.host, "--port", str(port),
           "--threads", str(args.threads)]
    if args.return_routed_experts:
        out.append("--return-routed-experts")
    if args.enable_sleep_mode:  # colocated placement: sleeps while the trainer steps
        out.append("--enable-sleep-mode")
    if args.weight_transfer_config is not None:  # weight_sync ipc / nccl: shared memory, or the trainer's broadcast
        out += ["--weight-transfer-config", args.weight_transfer_config]
    if args.config is not None and _fp8(args.config):
        out += ["--quantization", "fp8"]
    if env.get("SLURM_JOB_ID"):  # cluster: the head node serves the other nodes' driver
        out.append("--allow-non-loopback")
    return out


def _fp8(config: str) -> bool:
    """``rollout.fp8`` of the job config at ``config`` (validated as the jobs validate it)."""
    from runtime.jobs.common import JobContext

    return JobContext.load(config, log_to_file=False).model_spec.rollout.fp8


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.processes import die_with_parent
    from runtime.rollout import server

    server_argv = build_argv(argv)
    die_with_parent()
    print("rollout engine: python -m runtime.rollout.server " + " ".join(server_argv),
          file=sys.stderr, flush=True)
    return server.main(server_argv)


if __name__ == "__main__":
    sys.exit(main())
