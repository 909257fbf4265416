"""CPU micro-benchmarks of the runtime.

Run: ``.venv/bin/python bench/losses.py`` (``--threads N``: torch threads, default 1)

The script is a list of sections (``SECTIONS``): each is ``(name, measure, show)`` where
``measure() -> dict`` returns its results and ``show(dict)`` prints them; ``main()`` runs
them in order and returns ``{name: results}``. Add a section by appending to ``SECTIONS``.

Section "losses" times forward + backward of GRPO, GSPO, ESPO and CISPO on the same batch
(B=64, T=4096, varied response lengths), each the same way (its value, its closed-form
gradient, its metrics), interleaved (with ESPO's entropy grouping alone, as context) so
that drifts of the machine hit all alike, and reports each loss's ratio to GRPO of the
medians (goal for ESPO ≤ 1.3×). Absolute times are printed only as context: they depend on
the machine and its load, the ratio much less.

Section "router replay" runs ``bench/replay_overhead.py``'s ``measure_replay_overhead()``
(softmax router, the 245B example's): forward + backward of a small MoE block with router
replay (an R2 trace, and an R3 trace whose last token per 512 is routed live) against
without, interleaved; ratio of the medians, goal ≤ 1.05×.

Section "routing storage" is a computation, not a timing: the bytes of stored routing per
token of ``examples/compassmax-245b.yaml`` as the compiler's plan states them and as
``runtime.router_replay.routing_bytes_per_token`` computes them (the two must agree), and
what that makes per full-length sequence and per RL step (upper bounds: every rollout at
the maximum length).

Threads: ``main()`` runs torch on one thread unless told otherwise (``--threads N``). On a
shared 2-core machine a parallel region waits for its slowest thread, so whatever else runs
there inflates 2-thread timings several-fold and unevenly between repetitions (seen: the
same MoE step at 0.3 s and 2.8 s minutes apart), which no interleaving evens out; one
thread loses its core's share smoothly. Each section's header prints the 1-minute load
average before it runs: a load above the core count means other work competed with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replay_overhead import measure_replay_overhead
from runtime.losses import cispo_loss, espo_high_entropy_mask, espo_loss, grpo_loss, gspo_loss
from runtime.router_replay import routing_bytes_per_token, storage_dtype

ESPO_GOAL = 1.3


def _make_batch(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full-length response
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old_logp = -torch.rand(B, T, generator=g) * 3.0
    logp = (old_logp + 0.05 * torch.randn(B, T, generator=g)).requires_grad_()
    entropy = torch.rand(B, T, generator=g) * 4.0
    advantages = torch.randn(B, generator=g)
    return {
        "logp": logp,
        "old_logp": old_logp,
        "mask": mask,
        "entropy": entropy,
        "advantages": advantages,
    }


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_losses(B: int = 64, T: int = 4096, reps: int = 21, warmup: int = 3) -> dict:
    """Forward+backward time of every loss on one batch, interleaved, as ratios to GRPO.

    All four losses are timed the same way: one call (value, closed-form gradient attached
    by ``_WithGrad``, the common metrics with one device→host transfer) and ``backward()``.
    Each repetition times GRPO, GSPO, ESPO, CISPO and ESPO's entropy grouping alone, in an
    order that rotates between repetitions. A ratio is that of the medians; the median of
    the per-repetition ratios is reported as a check.
    """
    x = _make_batch(B, T)
    lp = x["logp"]
    args = (lp, x["old_logp"], x["advantages"], x["mask"])

    def backward(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            lp.grad = None
            fn().loss.backward()
        return run

    cases = {
        "grpo": backward(lambda: grpo_loss(*args)),
        "gspo": backward(lambda: gspo_loss(*args)),
        "espo": backward(lambda: espo_loss(*args, x["entropy"], vocab_size=151_936)),
        "cispo": backward(lambda: cispo_loss(*args)),
        "espo_grouping": lambda: espo_high_entropy_mask(x["entropy"], x["mask"], 0.2),
    }
    names = list(cases)
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(reps):
        order = names[i % len(names) :] + names[: i % len(names)]
        for k in order:
            times[k].append(_timed(cases[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    others = [k for k in names if k != "grpo"]
    return {
        "B": B,
        "T": T,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "ms": {k: 1e3 * v for k, v in med.items()},
        "ratio_to_grpo": {k: med[k] / med["grpo"] for k in others},
        "ratio_to_grpo_median_of_reps": {
            k: statistics.median(a / g for a, g in zip(times[k], times["grpo"], strict=True))
            for k in others
        },
        "goal": ESPO_GOAL,
    }


def show_losses(r: dict) -> None:
    ratio, per_rep, ms = r["ratio_to_grpo"], r["ratio_to_grpo_median_of_reps"], r["ms"]
    ok = "OK" if ratio["espo"] <= r["goal"] else "ABOVE GOAL"
    print(f"  ESPO/GRPO forward+backward: {ratio['espo']:.2f}x (goal ≤ {r['goal']}x) {ok}")
    for k in ratio:
        print(f"  {k}/grpo: {ratio[k]:.2f}x of medians, {per_rep[k]:.2f}x median of per-rep ratios")
    print(
        f"  context: B={r['B']} T={r['T']} reps={r['reps']} threads={r['threads']}; medians "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
    )


def show_replay(r: dict) -> None:
    worst = max(r["ratio"], r["ratio_r3"])
    ok = "OK" if worst <= r["goal"] else "ABOVE GOAL"
    print(
        f"  replay/off forward+backward: {r['ratio']:.3f}x, replay (R3 mask)/off: "
        f"{r['ratio_r3']:.3f}x (goal ≤ {r['goal']}x) {ok}"
    )
    print(
        f"  routing-only bound: {r['routing_bound']:.4f}x (1 + extra routing fwd+bwd time / "
        f"block time; routing medians off {r['routing_off_s'] * 1e3:.2f} ms, replay "
        f"{r['routing_replay_s'] * 1e3:.2f} ms, R3 {r['routing_replay_r3_s'] * 1e3:.2f} ms)"
    )
    print(
        f"  context: {r['score_function']} router, {r['num_experts']} experts top-{r['top_k']}, "
        f"{r['tokens']} tokens, hidden {r['hidden']}, ffn {r['ffn_hidden']}, {r['device']} "
        f"x{r['threads']} threads, reps={r['reps']}; medians off {r['off_s'] * 1e3:.1f} ms, "
        f"replay {r['replay_s'] * 1e3:.1f} ms, R3 {r['replay_r3_s'] * 1e3:.1f} ms"
    )


ROUTING_SPEC = "examples/compassmax-245b.yaml"


def measure_routing_storage(spec: str = ROUTING_SPEC) -> dict:
    """Stored routing of the 245B example: the plan's figures against the runtime's."""
    from compiler.api import validate

    root = Path(__file__).resolve().parents[1]
    v = validate(root / spec)
    plan = v.plan
    moe = v.source.spec.model.architecture.moe
    assert moe is not None, f"{spec} is not an MoE"
    runtime_bytes = routing_bytes_per_token(plan.params.moe_layers, moe.top_k, moe.num_experts)
    return {
        "spec": spec,
        "mode": v.source.spec.router_replay.mode,
        "moe_layers": plan.params.moe_layers,
        "top_k": moe.top_k,
        "num_experts": moe.num_experts,
        "plan_bytes_per_token": plan.routing_bytes_per_token,
        "plan_dtype": plan.routing_dtype,
        "runtime_bytes_per_token": runtime_bytes,
        "runtime_dtype": str(storage_dtype(moe.num_experts)),
        "seq_len": plan.seq_len,
        "rollouts_per_step": plan.rollouts_per_step,
        # policy rollouts the filters may add per step (the offline screen's proxy-model
        # rollouts are not the policy's and store no routing)
        "extra_rollouts": {
            b.type: b.worst_case_rollouts_per_step
            for b in plan.stage_budgets
            if b.worst_case_rollouts_per_step and b.type != "offline_pass_rate"
        },
        "bytes_per_sequence": plan.routing_bytes_per_token * plan.seq_len,
        "bytes_per_step": plan.routing_bytes_per_token * plan.seq_len * plan.rollouts_per_step,
    }


def show_routing_storage(r: dict) -> None:
    agree = (r["plan_bytes_per_token"] == r["runtime_bytes_per_token"]
             and r["plan_dtype"] == r["runtime_dtype"])
    print(
        f"  {r['spec']} (router_replay {r['mode']}): {r['moe_layers']} MoE layers x top-"
        f"{r['top_k']} of {r['num_experts']} experts"
    )
    print(f"  plan (compiler):  {r['plan_bytes_per_token']} bytes/token, {r['plan_dtype']} ids")
    print(
        f"  runtime.router_replay.routing_bytes_per_token: {r['runtime_bytes_per_token']} "
        f"bytes/token, storage_dtype {r['runtime_dtype']} -> {'agree' if agree else 'DISAGREE'}"
    )
    seq, step = r["bytes_per_sequence"], r["bytes_per_step"]
    print(
        f"  per full-length sequence ({r['seq_len']} tokens): {seq:,} bytes = "
        f"{seq / 1e6:.2f} MB ({seq / 2**20:.2f} MiB)"
    )
    print(
        f"  per RL step ({r['rollouts_per_step']} rollouts x {r['seq_len']} tokens, upper "
        f"bound: every rollout at max length): {step:,} bytes = {step / 1e9:.2f} GB "
        f"({step / 2**30:.2f} GiB)"
    )
    if r["extra_rollouts"]:
        n = r["rollouts_per_step"] + sum(r["extra_rollouts"].values())
        up = r["bytes_per_sequence"] * n
        stages = ", ".join(f"{k} +{v:g}" for k, v in r["extra_rollouts"].items())
        print(
            f"  with the rollouts the filters may add at their caps ({stages}): {n:g} "
            f"rollouts/step, {up:,.0f} bytes = {up / 1e9:.2f} GB ({up / 2**30:.2f} GiB)"
        )
    if not agree:
        raise AssertionError("the plan's routing storage and the runtime's disagree")


#: (name, measure, show), run in order by main().
SECTIONS: list[tuple[str, Callable[[], dict], Callable[[dict], None]]] = [
    ("losses", measure_losses, show_losses),
    ("router replay", measure_replay_overhead, show_replay),
    ("routing storage", measure_routing_storage, show_routing_storage),
]


DEFAULT_THREADS = 1


def main(threads: int | None = DEFAULT_THREADS) -> dict[str, dict]:
    """Run every section; ``threads``: torch's intra-op threads (None: leave torch's)."""
    if threads is not None:
        torch.set_num_threads(threads)
    results: dict[str, dict] = {}
    for name, measure, show in SECTIONS:
        print(f"[{name}] (load average, 1 min: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
        results[name] = measure()
        show(results[name])
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="CPU micro-benchmarks of the runtime.")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help=f"torch intra-op threads (default {DEFAULT_THREADS}; 0: torch's own)")
    args = ap.parse_args()
    main(args.threads or None)
