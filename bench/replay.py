"""Train–inference log-prob gap of a small Qwen3-MoE with router replay (R3) off vs on.

Setup (CPU, no download): a 4-layer Qwen3-MoE (hidden 128, 16 experts, top-4, vocab 64),
random init with a fixed seed. The "inference engine" is a bf16 copy of the policy that
samples responses token by token with a KV cache (temperature 1) and records, as vLLM's
``routed_experts`` does, the top-k expert ids of every token that went through its
forward (prompt tokens at prefill, each sampled token at the next decode step; the last
sampled token has none). Its log-probs μ(token) come from its bf16 logits.

The trainer is the fp32 policy. For the sampled sequences it computes per-token
log-probs of the response tokens in one teacher-forced forward

* off: with its own live top-k routing;
* r3: replaying the engine's ids (``align_routing`` → ``RoutingTrace.stack`` →
  ``RouterReplayGroup.replaying``), gates recomputed from its own fp32 router logits.

Printed, measured side by side on the same sequences: mean |logp_train − logp_rollout|
over response tokens for off and r3 and the ratio r3/off; the share of (token, layer)
routing decisions and of tokens (any layer) whose top-k expert set differs between
engine and trainer without replay (with r3 the trainer uses the engine's ids). Then the
same after a few optimizer steps on the trainer (weights drift from the rollout policy,
as with a stale rollout policy): replay can only remove the routing part of the gap.

Run: ``python -m bench.replay`` (or ``python bench/replay.py``); well under a minute.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.router_replay import (
    RoutingTrace,
    align_routing,
    patch_qwen3_moe,
)

SEED = 0
BATCH = 32
PROMPT_LEN = 16
RESPONSE_LEN = 48
DRIFT_STEPS = 3
DRIFT_LR = 1e-5


def build_model() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = Qwen3MoeForCausalLM(cfg).float().eval()
    return model


@torch.no_grad()
def engine_generate(engine: torch.nn.Module, group, prompts: torch.Tensor, steps: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Sample ``steps`` tokens per prompt; returns the sequences [B, P+T], the engine's
    log-probs of the sampled tokens [B, T] (fp32 from bf16 logits) and its routed
    experts [B, P+T−1, L, k] (vLLM's rows: every token fed through the forward)."""
    B = prompts.shape[0]
    seq = prompts
    rows: list[np.ndarray] = []
    logps: list[torch.Tensor] = []
    past = None
    step_in = prompts
    for _ in range(steps):
        with group.recording() as rec:
            out = engine(input_ids=step_in, past_key_values=past, use_cache=True)
        past = out.past_key_values
        ids = rec.trace.ids.numpy()  # [B·t, L, k], tokens flattened row-major
        rows.append(ids.reshape(B, step_in.shape[1], *ids.shape[1:]))
        logits = out.logits[:, -1].float()  # bf16 logits, softmax in fp32
        lp = F.log_softmax(logits, dim=-1)
        tok = torch.multinomial(lp.exp(), 1, generator=gen)
        logps.append(lp.gather(1, tok).squeeze(1))
        seq = torch.cat([seq, tok], dim=1)
        step_in = tok
    return seq, torch.stack(logps, 1), np.concatenate(rows, axis=1)


def train_logps(model: torch.nn.Module, seq: torch.Tensor, P: int) -> torch.Tensor:
    logits = model(input_ids=seq).logits.float()
    lp = F.log_softmax(logits[:, P - 1 : -1], dim=-1)
    return lp.gather(2, seq[:, P:, None]).squeeze(2)


def topk_sets_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., L, k] ids → bool [..., L]: the top-k sets differ."""
    return (np.sort(a, axis=-1) != np.sort(b, axis=-1)).any(axis=-1)


def measure(trainer, tgroup, seq, mu, routed, num_experts, prompt_len: int = PROMPT_LEN,
            r2: RoutingTrace | None = None) -> dict[str, float]:
    """Gaps mean |logp_train − logp_rollout| over the response tokens with the trainer's own
    routing (off), replaying the engine's (r3) and, given ``r2`` (a trace the trainer
    recorded earlier), replaying that; and how often the two routings differ."""
    B, n = seq.shape
    P = prompt_len
    traces = [align_routing(routed[b], prompt_len=P, response_len=n - P,
                            num_experts=num_experts) for b in range(B)]
    trace = RoutingTrace.stack(traces)
    with torch.no_grad():
        with tgroup.recording() as rec_off:
            lp_off = train_logps(trainer, seq, P)
        with tgroup.replaying(trace):
            lp_r3 = train_logps(trainer, seq, P)
        extra = {}
        if r2 is not None:
            with tgroup.replaying(r2):
                extra["gap_r2"] = (train_logps(trainer, seq, P) - mu).abs().mean().item()
    engine_ids = routed  # [B, n−1, L, k]
    off_ids = rec_off.trace.ids.numpy().reshape(B, n, *routed.shape[2:])[:, : n - 1]
    diff_off = topk_sets_differ(engine_ids.astype(np.int64), off_ids.astype(np.int64))
    moved = torch.from_numpy(diff_off.any(-1)[:, P - 1 :])  # position predicting each token
    gap_off = (lp_off - mu).abs().mean().item()
    gap_r3 = (lp_r3 - mu).abs().mean().item()
    return {
        "gap_off": gap_off, "gap_r3": gap_r3, **extra,
        "ratio": gap_r3 / gap_off if gap_off else float("nan"),
        "max_off": (lp_off - mu).abs().max().item(), "max_r3": (lp_r3 - mu).abs().max().item(),
        "moved": moved.float().mean().item(),
        "moved_off": (lp_off - mu).abs()[moved].mean().item(),
        "moved_r3": (lp_r3 - mu).abs()[moved].mean().item(),
        "layer_diff_off": float(diff_off.mean()), "token_diff_off": float(diff_off.any(-1).mean()),
    }


def report(title: str, m: dict[str, float]) -> None:
    print(title)
    print(f"  mean |logp_train - logp_rollout| over response tokens: off {m['gap_off']:.3e}  "
          f"r3 {m['gap_r3']:.3e}  ratio r3/off {m['ratio']:.3f}")
    print(f"  max  |logp_train - logp_rollout|: off {m['max_off']:.3e}  r3 {m['max_r3']:.3e}")
    print(f"  tokens predicted from a position routed differently ({m['moved']:.2%}): mean gap "
          f"off {m['moved_off']:.3e}  r3 {m['moved_r3']:.3e}  ratio "
          f"{m['moved_r3'] / m['moved_off']:.3f}")
    print(f"  top-k set differs engine vs trainer (off): {m['layer_diff_off']:.2%} of "
          f"(token, layer), {m['token_diff_off']:.2%} of tokens (any layer)")


def main() -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    policy = build_model()
    engine = copy.deepcopy(policy).to(torch.bfloat16)
    egroup = patch_qwen3_moe(engine)
    trainer = policy  # fp32
    tgroup = patch_qwen3_moe(trainer)
    num_experts = tgroup[0].num_experts
    gen = torch.Generator().manual_seed(SEED)
    prompts = torch.randint(0, 64, (BATCH, PROMPT_LEN), generator=gen)
    seq, mu, routed = engine_generate(engine, egroup, prompts, RESPONSE_LEN, gen)
    print(f"Qwen3-MoE 4 layers, hidden 128, 16 experts top-4, vocab 64 (random init, seed "
          f"{SEED}); engine bf16 KV-cache sampling, trainer fp32; {BATCH} sequences × "
          f"({PROMPT_LEN} prompt + {RESPONSE_LEN} response) tokens")
    report("same weights (rollout policy == trainer):",
           measure(trainer, tgroup, seq, mu, routed, num_experts))

    # weight drift: a few optimizer steps on the trainer (policy-gradient-like surrogate
    # on the sampled responses with random advantages), the engine keeps the old weights
    trainer.train()
    opt = torch.optim.AdamW(trainer.parameters(), lr=DRIFT_LR)
    adv = torch.randn(BATCH, 1, generator=gen)
    for _ in range(DRIFT_STEPS):
        loss = -(train_logps(trainer, seq, PROMPT_LEN) * adv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainer.eval()
    report(f"after {DRIFT_STEPS} AdamW steps (lr {DRIFT_LR:g}) on the trainer only (stale rollout "
           "policy):", measure(trainer, tgroup, seq, mu, routed, num_experts))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
