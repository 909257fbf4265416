"""Overhead of router replay on one MoE block's forward + backward.

Both variants run the same ``MoEBlock`` on the same input: "off" routes with the
live top-k, "replay" selects the ids recorded beforehand (R2) and recomputes the
gates from the live logits. Repetitions are interleaved (the order alternates every
repetition so that drift in machine speed hits both alike) and the medians are
compared: ratio = median(replay) / median(off); the goal is ≤ 1.05.

Run: ``python -m bench.replay_overhead`` (or ``python bench/replay_overhead.py``).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.router_replay import MoEBlock, RoutingTrace, collect_router_replays

GOAL = 1.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_replay_overhead(
    *,
    hidden: int = 512,
    ffn_hidden: int = 256,
    num_experts: int = 16,
    top_k: int = 4,
    tokens: int = 4096,
    score_function: str = "softmax",
    reps: int = 21,
    warmup: int = 3,
    routing_reps: int = 300,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Median forward+backward time of a ``MoEBlock`` with replay vs without.

    Variants: "off" (live top-k), "replay" (a recorded R2 trace, every token
    replayed), "replay_r3" (the same ids with the last token of every 512-token
    sequence left to the live router, as ``align_routing`` traces are).
    Returns a dict with the configuration, medians in seconds (``off_s``,
    ``replay_s``, ``replay_r3_s``), ``ratio`` = replay_s / off_s,
    ``ratio_r3`` = replay_r3_s / off_s, and ``goal`` (1.05). The routing step alone
    (logits → gates, forward + backward, replay context included) is timed over
    ``routing_reps`` repetitions: ``routing_*_s`` medians and ``routing_bound`` =
    1 + (worse replay routing − off routing) / off_s, the ratio the added work implies.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    block = MoEBlock(
        hidden,
        ffn_hidden,
        num_experts,
        top_k,
        score_function=score_function,  # type: ignore[arg-type]
    ).to(dev)
    group = collect_router_replays(block)
    x = torch.randn(tokens, hidden, device=dev)
    grad_out = torch.randn(tokens, hidden, device=dev)

    with torch.no_grad(), group.recording() as rec:
        block(x)
    trace = rec.trace
    # R3-like trace: the same ids, but sequences of 512 tokens whose last token has no
    # engine routing (mask False → routed live), as align_routing produces.
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[511::512] = False
    mask[-1] = False
    trace_r3 = RoutingTrace(trace.ids, trace.num_experts, mask)

    def step(replay_trace: RoutingTrace | None) -> None:
        block.zero_grad(set_to_none=True)
        if replay_trace is None:
            block(x).backward(grad_out)
        else:
            with group.replaying(replay_trace):
                block(x).backward(grad_out)

    variants: dict[str, RoutingTrace | None] = {"off": None, "replay": trace, "replay_r3": trace_r3}
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            step(variants[name])
    for i in range(reps):
        # rotate the order every repetition so that drift hits all variants alike
        for name in names[i % len(names) :] + names[: i % len(names)]:
            _sync(dev)
            t0 = time.perf_counter()
            step(variants[name])
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    # Routing alone (router logits → gates, forward + backward, inside the replay
    # context as in a training step): the only work replay adds or removes. Cheap
    # enough for many repetitions, so its delta is resolved far more precisely than
    # the end-to-end medians on a noisy machine.
    logits = block.router(x).detach().requires_grad_(True)
    rr = block.router_replay

    def route(replay_trace: RoutingTrace | None) -> None:
        logits.grad = None
        kw = {"score_function": score_function, "expert_bias": block.expert_bias}
        if replay_trace is None:
            gates, _ = rr.route(logits, **kw)
            gates.sum().backward()
        else:
            with group.replaying(replay_trace):
                gates, _ = rr.route(logits, **kw)
                gates.sum().backward()

    route_times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(routing_reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            _sync(dev)
            t0 = time.perf_counter()
            route(variants[name])
            _sync(dev)
            route_times[name].append(time.perf_counter() - t0)
    route_med = {name: statistics.median(ts) for name, ts in route_times.items()}
    delta = max(route_med["replay"], route_med["replay_r3"]) - route_med["off"]
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "hidden": hidden,
        "ffn_hidden": ffn_hidden,
        "num_experts": num_experts,
        "top_k": top_k,
        "tokens": tokens,
        "score_function": score_function,
        "reps": reps,
        "off_s": med["off"],
        "replay_s": med["replay"],
        "replay_r3_s": med["replay_r3"],
        "ratio": med["replay"] / med["off"],
        "ratio_r3": med["replay_r3"] / med["off"],
        "routing_off_s": route_med["off"],
        "routing_replay_s": route_med["replay"],
        "routing_replay_r3_s": route_med["replay_r3"],
        "routing_bound": 1.0 + delta / med["off"],
        "goal": GOAL,
    }


def main() -> None:
    for score_function in ("softmax", "sigmoid"):
        r = measure_replay_overhead(score_function=score_function)
        worst = max(r["ratio"], r["ratio_r3"])
        verdict = "ok" if worst <= GOAL else "ABOVE GOAL"
        print(
            f"{r['score_function']:>7} router: replay/off = {r['ratio']:.3f}x, "
            f"replay(R3 mask)/off = {r['ratio_r3']:.3f}x ({verdict}, goal ≤ {GOAL}x); "
            f"routing-only bound {r['routing_bound']:.4f}x "
            f"(routing fwd+bwd: off {r['routing_off_s'] * 1e3:.2f} ms, replay "
            f"{r['routing_replay_s'] * 1e3:.2f} ms, R3 {r['routing_replay_r3_s'] * 1e3:.2f} ms)  "
            f"[{r['tokens']} tokens, hidden {r['hidden']}, ffn {r['ffn_hidden']}, "
            f"{r['num_experts']} experts top-{r['top_k']}, {r['device']} x{r['threads']} "
            f"threads; medians of {r['reps']}: off {r['off_s'] * 1e3:.1f} ms, "
            f"replay {r['replay_s'] * 1e3:.1f} ms, R3 {r['replay_r3_s'] * 1e3:.1f} ms]"
        )


if __name__ == "__main__":
    main()
