"""Section R of ``bench/evidence.py``: router replay's effect on the train–inference gap.

In-process, on the SFT policy and prompts of the eval split: a bf16 copy of the policy is the
engine (KV-cache sampling at temperature 1, recording the experts of every token as vLLM's
``routed_experts`` does); the trainer scores the same sequences in one teacher-forced forward
with off (its own routing), R2 (routing recorded in its own forward before the updates) and R3
(the engine's routing), in two precision pairs, at the start and after a few AdamW updates of
the trainer (``bench/evidence.py``'s module doc says what each figure means).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from bench.stats import fmt_ci, median_ci, quantile

if TYPE_CHECKING:
    from bench.evidence import Mode


def gap_ratio(gap: float, off: float) -> float:
    """gap / off, with 0 / 0 = 1 (no gap with or without replay: replay changed nothing)."""
    if off == 0.0:
        return 1.0 if gap == 0.0 else math.inf
    return gap / off


def section_r(start: Path, mode: Mode) -> tuple[float, list[str]]:
    """Train–inference gap off / R2 / R3 on the SFT policy, two precision pairs; returns R3's
    median ratio to off in the same precision after the updates."""
    import torch

    from bench.replay import engine_generate, measure, train_logps
    from runtime.policy import load_policy
    from runtime.router_replay import patch_qwen3_moe

    torch.set_num_threads(2)
    rows = [json.loads(x) for x in (start / "artifacts" / "dataset" / "eval.jsonl").read_text().splitlines()]
    model, tok = load_policy(str(start / "artifacts" / "policy_sft"))
    encoded = [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]
    width = max(set(map(len, encoded)), key=[len(e) for e in encoded].count)
    same_width = [e for e in encoded if len(e) == width]  # one prompt length: no padding needed
    pairs = (("same precision (bf16 / bf16)", torch.bfloat16), ("bf16 engine / fp32 trainer", torch.float32))
    response_len = 8
    stats: dict[tuple[str, str], dict[str, list[float]]] = {
        (label, when): {"off": [], "r2": [], "r3": [], "flips": []}
        for label, _ in pairs for when in ("start", "after")}

    def record(m: dict[str, float], into: dict[str, list[float]]) -> None:
        for name in ("off", "r2", "r3"):
            into[name].append(m[f"gap_{name}"])
        into["flips"].append(m["layer_diff_off"])

    for seed in range(mode.seeds):
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(same_width), generator=gen)[: mode.replay_batch].tolist()
        prompts = torch.tensor([same_width[i] for i in pick])
        engine = copy.deepcopy(model).to(torch.bfloat16).eval()
        seq, mu, routed = engine_generate(engine, patch_qwen3_moe(engine), prompts, response_len, gen)
        adv = torch.randn(len(pick), 1, generator=gen)
        for label, dtype in pairs:
            trainer = copy.deepcopy(model).to(dtype).eval()
            group = patch_qwen3_moe(trainer)
            with torch.no_grad(), group.recording() as rec:  # R2: the old-policy forward's routing
                train_logps(trainer, seq, width)
            args = (trainer, group, seq, mu, routed, group[0].num_experts, width, rec.trace)
            record(measure(*args), stats[(label, "start")])
            trainer.train()
            opt = torch.optim.AdamW(trainer.parameters(), lr=1e-4)
            for _ in range(mode.drift_steps):
                loss = -(train_logps(trainer, seq, width).float() * adv).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            trainer.eval()
            record(measure(*args), stats[(label, "after")])
    lines = ["== R. router replay: mean |logp_train − logp_rollout| over response tokens, SFT policy ==",
             f"{mode.seeds} seeds × {len(pick)} eval prompts of {width} tokens, {response_len} tokens "
             f"sampled by a bf16 copy (T = 1); after: {mode.drift_steps} AdamW updates (lr 1e-4) of "
             "the trainer only; medians over seeds (95% bootstrap CI)",
             f"{'precision':30s} {'when':6s} {'routing differs':>15s} {'gap off':>10s} "
             f"{'R2 / off':>20s} {'R3 / off':>20s}"]
    r3_same = math.nan
    for (label, when), g in stats.items():
        r2 = median_ci([gap_ratio(a, b) for a, b in zip(g["r2"], g["off"], strict=True)])
        r3 = median_ci([gap_ratio(a, b) for a, b in zip(g["r3"], g["off"], strict=True)])
        if label.startswith("same") and when == "after":
            r3_same = r3[0]
        lines.append(f"{label:30s} {when:6s} {quantile(g['flips'], 0.5):15.2%} "
                     f"{quantile(g['off'], 0.5):10.2e} {fmt_ci(r2, 1, 3):>20s} {fmt_ci(r3, 1, 3):>20s}")
    lines.append("routing differs: share of (token, layer) whose top-k set differs between the "
                 "engine and the trainer's own routing; R2 replays the trainer's routing recorded "
                 "before the updates, R3 the engine's; 0 / 0 counts as a ratio of 1")
    return r3_same, lines
