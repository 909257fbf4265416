"""The Megatron trainer on one GPU with NCCL, unpatched: correctness, then speed.

Run by ``tools/gpu_check.sh`` on an H100/H200 (never by CI). Prints one JSON object per
line (``{"section": ...}``) and a summary; ``--out FILE`` also writes them there.

Sections:

``local_attention`` (bfloat16): one layer's core attention, megatron-core's local
``DotProductAttention`` against the trainer's SDPA module (``runtime.megatron.attention``):
memory per score element against ``compiler.estimates`` (local: 6 B kept / 14 B at peak;
SDPA: 0), forward + backward time, output difference; SDPA alone at 16k and 32k tokens.

``conformance`` (float32, TF32 off): one RL step (ESPO, TIS, R3, two optimizer steps) of the
Megatron trainer (``runtime.megatron``: ``use_devices("gpu")``, NCCL, the token dispatcher
and activation recomputation the spec names) against the embedded trainer
(``runtime.trainer.Trainer``) on the same weights and batch, both on the GPU; prints
max |Δθ| against how far the step moved the weights, as tests/megatron does on the CPU.

``throughput`` (bfloat16): a Qwen3-30B-A3B-shaped model cut to ``--layers`` layers (hidden
2048, 32 heads / 4 KV heads of 128, 128 experts of 768, top-8, vocabulary 151,936): RL steps
(ESPO, two optimizer steps over one old-policy pass) of the Megatron trainer with R3 on and
off and of the embedded trainer with R3 on. For each: tokens/s, peak GPU memory, and

    MFU = (2 + 6) · N_active · tokens / step time / peak FLOP/s

(the old-policy forward, 2·N per token, plus the update's forward and backward, 6·N;
N_active counts the attention and router weights, top-k experts and the output layer of
every token; attention score FLOPs are left out). Ratios are measured side by side in one
process: R3-on / R3-off and Megatron / embedded step time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_device as dev  # noqa: E402
from bench.gpu_attention import local_attention  # noqa: E402
from bench.gpu_device import (  # noqa: E402
    peak_memory,
    release,
    reset_peak_memory,
    sync,
    timed_steps,
)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)
# Qwen3-30B-A3B's shape (its config.json) but for the number of layers; the rehearsal's is tiny.
QWEN3_30B_A3B = dict(hidden=2048, heads=32, kv=4, head_dim=128, ffn=768, experts=128, top_k=8,
                     vocab=151936)
REHEARSAL = dict(hidden=128, heads=4, kv=2, head_dim=32, ffn=64, experts=8, top_k=2, vocab=512)
# The dispatchers and recomputations the conformance section checks (the spec's
# moe.token_dispatcher and train.recompute, as runtime/jobs/train.py passes them).
GPU_LAYOUTS: list[dict[str, Any]] = [
    {"moe_token_dispatcher_type": "alltoall"},
    {"moe_token_dispatcher_type": "alltoall", "recompute_granularity": "full",
     "recompute_method": "uniform", "recompute_num_layers": 1},
    {"moe_token_dispatcher_type": "allgather", "recompute_granularity": "selective"},
]
# The two trainers differ by summation order only; Adam turns that into differences of up to a
# few per cent of the step for weights whose gradient is near zero (measured on the CPU with
# this model: max |Δθ| 5.7e-5 for a step of 3.3e-3). "ok": under 1/20 of the step.
CONFORMANCE_REL = 0.05
ALGORITHM: dict[str, Any] = {
    "loss": "espo", "espo": {"alpha": 0.02, "high_entropy_fraction": 0.2},
    "correction": {"mode": "tis", "cap": 2.0}, "kl": {"coefficient": 0.0, "estimator": "k3"},
}


def train_cfg(micro: int, global_batch: int, lr: float = 1e-4) -> dict[str, Any]:
    return {"micro_batch_size": micro, "global_batch_size": global_batch,
            "optimizer": {"lr": lr, "min_lr": lr / 10, "adam_beta1": 0.9, "adam_beta2": 0.98,
                          "adam_eps": 1e-8, "weight_decay": 0.1, "clip_grad": 1.0,
                          "warmup_steps": 1, "distributed": True}}


def qwen3_moe(layers: int, hidden: int, heads: int, kv: int, head_dim: int, ffn: int,
              experts: int, top_k: int, vocab: int) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        moe_intermediate_size=ffn, intermediate_size=ffn * 4, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=4096,
        rope_theta=1e6, tie_word_embeddings=False, router_aux_loss_coef=0.0,
        decoder_sparse_step=1, mlp_only_layers=[])


def active_params(cfg: Any) -> int:
    """Weights one token multiplies by: attention, router, top-k experts, output layer."""
    h, d = int(cfg.hidden_size), int(cfg.head_dim)
    q, kv = int(cfg.num_attention_heads) * d, int(cfg.num_key_value_heads) * d
    attn = h * q + 2 * h * kv + q * h
    experts = int(cfg.num_experts_per_tok) * 3 * h * int(cfg.moe_intermediate_size)
    router = h * int(cfg.num_experts)
    return int(cfg.num_hidden_layers) * (attn + experts + router) + h * int(cfg.vocab_size)


def hf_model(cfg: Any, dtype: torch.dtype, seed: int) -> Any:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    with torch.device(dev.DEVICE):
        model = Qwen3MoeForCausalLM(cfg)
    return model.to(dtype).eval()


def make_batch(cfg: Any, b: int, t: int, prompt: int, seed: int, device: str) -> Any:
    """B responses of varying length (right-padded) after ``prompt`` tokens, rollout
    log-probs near a real policy's, sequence advantages, and random distinct R3 experts
    (the last real position and padding unmasked, as ``align_routing`` leaves them)."""
    from runtime.router_replay import RoutingTrace
    from runtime.trainer import TrainBatch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t * 3 // 4, t + 1, (b,), generator=g)
    attn = torch.arange(t)[None] < lengths[:, None]
    ids = torch.where(attn, torch.randint(1, int(cfg.vocab_size), (b, t), generator=g), 0)
    loss_mask = attn & (torch.arange(t)[None] >= prompt)
    rollout = (-float(torch.log(torch.tensor(float(cfg.vocab_size))))
               + 0.05 * torch.randn(b, t, generator=g)) * loss_mask
    adv = torch.randn(b, generator=g)
    layers, k, e = int(cfg.num_hidden_layers), int(cfg.num_experts_per_tok), int(cfg.num_experts)
    experts = torch.rand(b, t, layers, e, generator=g).topk(k, dim=-1).indices
    mask = attn.clone()
    mask[torch.arange(b), lengths - 1] = False
    batch = TrainBatch(ids, attn, loss_mask, rollout, adv, RoutingTrace(experts, e, mask))
    if device == "cpu":
        return batch
    return TrainBatch(*(x.to(device) for x in (ids, attn, loss_mask, rollout, adv)),
                      RoutingTrace(experts.to(device), e, mask.to(device)))


def megatron_trainer(cfg: Any, weights: dict[str, torch.Tensor], *, dtype: torch.dtype,
                     replay: str, train: dict[str, Any], total_steps: int,
                     **overrides: Any) -> tuple[Any, Any]:
    """A world-1 Megatron trainer on this GPU (NCCL, file:// rendezvous: nothing listens)."""
    from runtime.megatron.engine import MegatronTrainer
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import init_parallel, use_devices

    backend, _ = use_devices("gpu" if dev.DEVICE == "cuda" else "cpu")
    assert backend == ("nccl" if dev.DEVICE == "cuda" else "gloo"), backend
    rendezvous = Path(tempfile.mkdtemp(prefix="rlspec-gpu-")) / "rendezvous"
    pg = init_parallel(0, 1, rendezvous, backend=backend, seed=1234)
    model = build_gpt_model(cfg, pg, routing_replay=replay != "off", dtype=dtype, **overrides)
    load_hf_weights(model, weights, cfg)
    trainer = MegatronTrainer(model, algorithm=ALGORITHM, train=train,
                              vocab_size=int(cfg.vocab_size), replay_mode=replay,
                              total_optimizer_steps=total_steps)
    return model, trainer


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


def conformance(emit: Callable[..., None], replays: list[str]) -> None:
    from runtime.megatron.hf_weights import gather_full_state_dict, megatron_to_hf
    from runtime.router_replay import patch_qwen3_moe
    from runtime.trainer import Trainer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = qwen3_moe(layers=2, hidden=256, heads=4, kv=2, head_dim=64, ffn=128, experts=16,
                    top_k=4, vocab=1024)
    train = train_cfg(micro=2, global_batch=5, lr=1e-3)  # as tests/megatron/_train_worker
    # the rehearsal: alltoall and recomputation need CUDA (runtime.megatron.cpu)
    layouts = GPU_LAYOUTS if dev.DEVICE == "cuda" else [{"moe_token_dispatcher_type": "allgather"}]
    for replay, overrides in ((r, o) for r in replays for o in layouts):
        hf = hf_model(cfg, torch.float32, seed=0)
        start = {k: v.detach().clone() for k, v in hf.state_dict().items()}
        embedded = copy.deepcopy(hf)
        ref = Trainer(embedded, algorithm=ALGORITHM, train=train, vocab_size=1024,
                      replay_mode=replay,
                      replay=patch_qwen3_moe(embedded) if replay != "off" else None,
                      total_optimizer_steps=8)
        ref_metrics = ref.step(make_batch(cfg, 10, 24, 4, seed=11, device=dev.DEVICE), epochs=2, seed=3)
        model, trainer = megatron_trainer(cfg, start, dtype=torch.float32, replay=replay,
                                          train=train, total_steps=8, **overrides)
        metrics = trainer.step(make_batch(cfg, 10, 24, 4, seed=11, device="cpu"), epochs=2, seed=3)
        got = megatron_to_hf(gather_full_state_dict(model), cfg)
        want = embedded.state_dict()
        diff, moved = max_diff(got, want), max_diff(want, start)
        emit(section="conformance", replay=replay, layout=overrides, dtype="float32",
             ok=diff <= CONFORMANCE_REL * moved, max_abs_diff=diff, moved=moved,
             loss_megatron=metrics.get("loss"), loss_embedded=ref_metrics.get("loss"),
             grad_norm_megatron=metrics.get("grad_norm"),
             grad_norm_embedded=ref_metrics.get("grad_norm"),
             entropy_megatron=metrics.get("entropy"), entropy_embedded=ref_metrics.get("entropy"))
        del model, trainer, hf, embedded, ref
        release()


def optimizer_offload(emit: Callable[..., None]) -> None:
    """One RL step of the Megatron trainer with optimizer CPU offload (megatron-core's
    HybridDeviceOptimizer, train.optimizer.cpu_offload) against the same step without: equal
    weights (float32), and the peak GPU memory of both (bfloat16)."""
    from runtime.megatron.hf_weights import gather_full_state_dict, megatron_to_hf

    cfg = qwen3_moe(layers=2, hidden=1024, heads=8, kv=2, head_dim=128, ffn=512, experts=16,
                    top_k=4, vocab=4096)
    results: dict[tuple[str, float], Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = hf_model(cfg, torch.float32, seed=0)
        start = {k: v.detach().clone() for k, v in hf.state_dict().items()}
        del hf
        for fraction in (0.0, 1.0, 0.5):
            train = train_cfg(micro=2, global_batch=5, lr=1e-3)
            if fraction:
                train["optimizer"] = {**train["optimizer"], "cpu_offload": True,
                                      "offload_fraction": fraction}
            reset_peak_memory()
            model, trainer = megatron_trainer(cfg, start, dtype=dtype, replay="off",
                                              train=train, total_steps=8)
            batch = make_batch(cfg, 10, 64, 4, seed=11, device="cpu")
            metrics = trainer.step(batch, epochs=2, seed=3)
            sync()
            got = {k: v.float().cpu() for k, v in gather_full_state_dict(model).items()}
            results[(str(dtype), fraction)] = got
            row: dict[str, Any] = dict(section="optimizer_offload", dtype=str(dtype),
                                       offload_fraction=fraction, loss=metrics.get("loss"),
                                       grad_norm=metrics.get("grad_norm"),
                                       peak_gb=peak_memory() / 1e9)
            if fraction:
                plain = results[(str(dtype), 0.0)]
                full = {k: v.float().cpu() for k, v in start.items()}
                moved = max_diff(megatron_to_hf(plain, cfg), full)
                diff = max(float((got[k] - plain[k]).abs().max()) for k in got)
                row.update(max_abs_diff=diff, moved=moved, ok=diff <= 1e-3 * moved)
            emit(**row)
            del model, trainer
            release()


def throughput(emit: Callable[..., None], layers: int, batch: int, seq: int, micro: int,
               reps: int) -> None:
    from runtime.router_replay import patch_qwen3_moe
    from runtime.trainer import Trainer

    shape = QWEN3_30B_A3B if dev.DEVICE == "cuda" else REHEARSAL
    cfg = qwen3_moe(layers=layers, **shape)
    n_active = active_params(cfg)
    train = train_cfg(micro=micro, global_batch=batch // 2)  # two optimizer steps per RL step
    name = torch.cuda.get_device_name() if dev.DEVICE == "cuda" else "cpu (rehearsal)"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    dtype = torch.bfloat16 if dev.DEVICE == "cuda" else torch.float32
    hf = hf_model(cfg, dtype, seed=0)
    weights = {k: v.detach() for k, v in hf.state_dict().items()}
    cpu_batch = make_batch(cfg, batch, seq, 64, seed=5, device="cpu")
    tokens = int(cpu_batch.attention_mask.sum())
    results: dict[str, float] = {}

    def report(label: str, times: list[float]) -> None:
        step = statistics.median(times)
        results[label] = step
        emit(section="throughput", engine=label, layers=layers, responses=batch, seq=seq,
             micro_batch=micro, tokens_per_step=tokens, step_s=round(step, 4),
             step_s_all=[round(t, 4) for t in times], tokens_per_s=round(tokens / step),
             peak_mem_gib=round(peak_memory() / 2**30, 2),
             mfu=round(8 * n_active * tokens / step / peak, 4), active_params=n_active,
             gpu=name)

    for replay in ("r3", "off"):
        reset_peak_memory()
        model, trainer = megatron_trainer(cfg, weights, dtype=dtype, replay=replay,
                                          train=train, total_steps=100,
                                          moe_token_dispatcher_type="alltoall"
                                          if dev.DEVICE == "cuda" else "allgather")
        report(f"megatron-{replay}",
               timed_steps(lambda i, t=trainer: t.step(cpu_batch, epochs=1, seed=i), 1, reps))
        del model, trainer
        release()
    reset_peak_memory()
    gpu_batch = make_batch(cfg, batch, seq, 64, seed=5, device=dev.DEVICE)
    embedded = Trainer(hf, algorithm=ALGORITHM, train=train, vocab_size=int(cfg.vocab_size),
                       replay_mode="r3", replay=patch_qwen3_moe(hf), total_optimizer_steps=100)
    report("embedded-r3",
           timed_steps(lambda i: embedded.step(gpu_batch, epochs=1, seed=i), 1, reps))
    emit(section="ratios", r3_on_over_off_megatron=round(results["megatron-r3"]
                                                         / results["megatron-off"], 3),
         megatron_over_embedded_r3=round(results["megatron-r3"] / results["embedded-r3"], 3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="conformance,throughput")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="responses per RL step")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per response, prompt included")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--replay", default="r3", help="conformance: router replay modes, e.g. r3,off")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rehearse", action="store_true",
                    help="run every section on the CPU with a tiny model (megatron-core patched "
                         "for the CPU, gloo, float32): checks this script, measures nothing")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.rehearse:
        dev.DEVICE = "cpu"
        args.batch, args.seq, args.micro, args.reps, args.layers = 4, 32, 2, 1, 2
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (or --rehearse)", file=sys.stderr)
        return 2
    os.environ.setdefault("LOCAL_RANK", "0")
    failed = False

    def emit(**row: Any) -> None:
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if args.out:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    for section in args.sections.split(","):
        try:
            if section == "conformance":
                conformance(emit, args.replay.split(","))
            elif section == "local_attention":
                local_attention(emit)
            elif section == "optimizer_offload":
                optimizer_offload(emit)
            elif section == "throughput":
                throughput(emit, args.layers, args.batch, args.seq, args.micro, args.reps)
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as exc:  # report and go on: one device run must say as much as it can
            import traceback

            failed = True
            emit(section=section, error=f"{type(exc).__name__}: {exc}",
                 traceback=traceback.format_exc()[-3000:])
            with contextlib.suppress(Exception):  # nothing left to release
                release()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
