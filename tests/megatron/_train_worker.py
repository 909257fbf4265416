"""One rank of a Megatron-vs-embedded training run (tests/megatron): ``python -m
tests.megatron._train_worker RANK WORLD_SIZE TP EP WORKDIR REPLAY LOSS [PP [RECOMPUTE]]
[KEY=VALUE ...]`` (RECOMPUTE: ``full`` or ``selective`` activation recomputation on the Megatron
side; REPLAY ``resume``: the checkpoint round trip of :func:`run_resume` instead; LOSS
``<loss>-kl`` adds a KL penalty to the frozen initial policy). Options (:data:`LAYOUT`):
``etp=N`` expert-tensor parallelism (``etp=tp``: Megatron's default, ETP = TP), ``layers=N``
decoder layers of the tiny model, ``vpp=N`` virtual pipeline stages (model chunks, the
interleaved schedule), ``first=N`` / ``last=N`` layers of the first / last pipeline stage
(uneven stages), ``cp=N`` context parallelism (``runtime.megatron.context_parallel``),
``tie=1`` tied input embedding and output layer (qwen3_moe), ``dtype=bfloat16`` the
Megatron model's parameters (:func:`run_resume` only), ``family=F``
the model family (qwen3_moe, the default: the tiny example's; glm4_moe, deepseek_v3, qwen3, llama:
``tests.families``).

Both trainers start from the same HF weights (the tiny model of the family, seed 0) and take
the same RL step on the same batch: two PPO epochs × two optimizer steps, micro-batches of 2,
Adam with weight decay, TIS correction. Each rank saves to WORKDIR/rank{RANK}.pt the
embedded trainer's updated HF weights and metrics, the Megatron trainer's (exported to HF
through ``gather_full_state_dict`` → ``megatron_to_hf``) and the export of the untouched
Megatron model. Rendezvous: ``file://WORKDIR/rendezvous`` over gloo (loopback only).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.megatron._worker import tiny_hf_policy

ALGO: dict[str, Any] = {
    "espo": {"alpha": 0.02, "high_entropy_fraction": 0.2},
    "grpo": {"clip_low": 0.2, "clip_high": 0.28},
    "correction": {"mode": "tis", "cap": 2.0}, "kl": {"coefficient": 0.0, "estimator": "k3"},
}
TRAIN: dict[str, Any] = {
    "micro_batch_size": 2, "global_batch_size": 5,
    "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.98,
                  "adam_eps": 1e-8, "weight_decay": 0.1, "clip_grad": 1.0, "warmup_steps": 1,
                  "distributed": True},
}
EPOCHS, SEED, TOTAL_STEPS = 2, 3, 8
# KEY=VALUE options and their defaults ("etp": "tp" resolves to the TP size)
LAYOUT: dict[str, Any] = {"etp": 1, "layers": 2, "vpp": 0, "first": 0, "last": 0, "tie": 0,
                          "family": "qwen3_moe", "cp": 1, "dtype": "float32"}


def policy(family: str, seed: int = 0, layers: int = 2, tie: bool = False) -> Any:
    """The tiny HF policy of ``family`` (module doc)."""
    from tests.families import tiny_deepseek_policy, tiny_dense_policy, tiny_glm_policy

    if family == "qwen3_moe":
        return tiny_hf_policy(seed=seed, layers=layers, tie=tie)
    if tie:
        raise ValueError("tie=1 is built for the qwen3_moe family only")
    if family == "glm4_moe":
        return tiny_glm_policy(seed, layers=layers)
    if family == "deepseek_v3":  # MLA
        return tiny_deepseek_policy(seed, layers=layers)
    return tiny_dense_policy(family, seed, layers=layers)


def rl_batch(model: Any, replay: str, b: int = 10, t: int = 14) -> Any:
    """B responses of varying length (right-padded), 4 prompt tokens each, the engine's
    log-probs = the policy's + noise, sequence advantages; with r3 the experts of another
    policy (the last real position and padding unmasked, as ``align_routing``)."""
    from runtime.megatron.args import hf_num_experts
    from runtime.router_replay import RoutingTrace, patch_moe_routers
    from runtime.trainer import TrainBatch, sequence_logprobs

    g = torch.Generator().manual_seed(11)
    vocab = int(model.config.vocab_size)
    lengths = torch.randint(7, t + 1, (b,), generator=g)
    attn = torch.arange(t)[None] < lengths[:, None]
    ids = torch.where(attn, torch.randint(1, vocab, (b, t), generator=g), 0)
    loss_mask = attn & (torch.arange(t)[None] >= 4)
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, ids, attn)
    rollout = (logp + 0.05 * torch.randn(b, t, generator=g)) * loss_mask
    adv = torch.randn(b, generator=g)
    routing = None
    if replay == "r3":
        # The engine's experts: another policy's routing, so that replaying them differs from
        # routing freely from the first forward on.
        engine = policy(model.config.model_type, seed=1,
                        layers=int(model.config.num_hidden_layers))
        group = patch_moe_routers(engine)
        with torch.no_grad(), group.recording() as rec:
            sequence_logprobs(engine, ids, attn)
        trace_ids = rec.trace.ids.reshape(b, t, *rec.trace.ids.shape[1:])
        mask = attn.clone()
        mask[torch.arange(b), lengths - 1] = False
        routing = RoutingTrace(trace_ids, hf_num_experts(model.config), mask)
    return TrainBatch(ids, attn, loss_mask, rollout, adv, routing)


RECOMPUTE: dict[str, dict[str, Any]] = {  # as runtime/megatron/args.py renders train.recompute
    "none": {},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective"},
}


def run(rank: int, world_size: int, tp: int, ep: int, workdir: Path, replay: str,
        loss: str, pp: int = 1, recompute: str = "none",
        options: dict[str, Any] | None = None) -> dict[str, Any]:
    from runtime.megatron.cpu import enable_cpu

    enable_cpu()
    from runtime.megatron import context_parallel
    from runtime.megatron.engine import MegatronTrainer
    from runtime.megatron.hf_weights import gather_full_state_dict, load_hf_weights, megatron_to_hf
    from runtime.megatron.model import build_gpt_chunks
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.router_replay import patch_moe_routers
    from runtime.trainer import Trainer

    layout, stages, layers = _layout(tp, ep, pp, options)
    torch.manual_seed(0)
    options = {**LAYOUT, **(options or {})}
    hf = policy(options["family"], layers=layers, tie=bool(int(options["tie"])))
    batch = rl_batch(hf, replay)
    kl = loss.endswith("-kl")  # "<loss>-kl": KL (k3) to the frozen initial policy
    loss = loss.removesuffix("-kl")
    algorithm = {**ALGO, "loss": loss}
    if kl:
        algorithm["kl"] = {"coefficient": 0.5, "estimator": "k3"}
    vocab = int(hf.config.vocab_size)

    embedded = copy.deepcopy(hf)
    group = patch_moe_routers(embedded) if replay != "off" else None
    ref = Trainer(embedded, algorithm=algorithm, train=TRAIN, vocab_size=vocab,
                  replay_mode=replay, replay=group, total_optimizer_steps=TOTAL_STEPS,
                  reference=copy.deepcopy(hf) if kl else None)
    ref_metrics = ref.step(batch, epochs=EPOCHS, seed=SEED)
    free = None  # the control: the same step routing freely
    if replay != "off":
        control = copy.deepcopy(hf)
        Trainer(control, algorithm=algorithm, train=TRAIN, vocab_size=vocab,
                total_optimizer_steps=TOTAL_STEPS).step(batch, epochs=EPOCHS, seed=SEED)
        free = control.state_dict()

    pg = init_parallel(rank, world_size, workdir / "rendezvous", cp=int(options["cp"]),
                       **layout)
    try:
        model = build_gpt_chunks(hf.config, pg, **layout, **stages,
                                 routing_replay=replay != "off", sequence_parallel=tp > 1,
                                 **RECOMPUTE[recompute])
        load_hf_weights(model, hf.state_dict(), hf.config)
        initial = megatron_to_hf(gather_full_state_dict(model), hf.config)
        reference = None
        if kl:
            reference = build_gpt_chunks(hf.config, pg, **layout, **stages,
                                         sequence_parallel=tp > 1)
            load_hf_weights(reference, hf.state_dict(), hf.config)
        trainer = MegatronTrainer(model, algorithm=algorithm, train=TRAIN, vocab_size=vocab,
                                  replay_mode=replay, total_optimizer_steps=TOTAL_STEPS,
                                  reference=reference)
        metrics = trainer.step(batch, epochs=EPOCHS, seed=SEED)
        full = gather_full_state_dict(model)
        trained = megatron_to_hf(full, hf.config)
        # tied over pipeline stages: the last stage's copy of the embedding (None otherwise)
        tied_copy = full.get("output_layer.weight") if hf.config.tie_word_embeddings else None
        return {"cp": context_parallel.size(), "hf": hf.state_dict(), "initial": initial,
                "tied_copy": tied_copy,
                "ref": embedded.state_dict(),
                "got": trained, "free": free, "ref_metrics": ref_metrics, "metrics": metrics,
                "lr": TRAIN["optimizer"]["lr"]}
    finally:
        destroy_parallel()


def _layout(tp: int, ep: int, pp: int, options: dict[str, Any] | None
            ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(parallel sizes, uneven-stage config fields, layers) of the worker's options."""
    from runtime.megatron.args import pipeline_stages

    opts = {**LAYOUT, **(options or {})}
    layout = {"tp": tp, "ep": ep, "pp": pp, "etp": tp if opts["etp"] == "tp" else int(opts["etp"]),
              "vpp": int(opts["vpp"]) or None}
    stages = pipeline_stages(pp, int(opts["first"]) or None, int(opts["last"]) or None)
    if int(opts["cp"]) > 1:  # a TransformerConfig field (init_parallel takes cp itself)
        stages["context_parallel_size"] = int(opts["cp"])
    return layout, stages, int(opts["layers"])


def run_resume(rank: int, world_size: int, tp: int, ep: int, workdir: Path, pp: int = 1,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step, save a Megatron checkpoint, step again (A); a fresh trainer of other weights loads
    the checkpoint and takes the second step (B). A and B must end equal: the checkpoint holds
    weights, the distributed optimizer's Adam moments and the step count."""
    from runtime.megatron.cpu import enable_cpu

    enable_cpu()
    from runtime.megatron.engine import MegatronTrainer
    from runtime.megatron.hf_weights import gather_full_state_dict, load_hf_weights, megatron_to_hf
    from runtime.megatron.model import build_gpt_chunks
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    layout, stages, layers = _layout(tp, ep, pp, options)
    dtype = getattr(torch, {**LAYOUT, **(options or {})}["dtype"])  # bfloat16: --bf16's model
    torch.manual_seed(0)
    hf = tiny_hf_policy(layers=layers)
    first, second = rl_batch(hf, "off"), rl_batch(tiny_hf_policy(seed=2), "off")
    algorithm = {**ALGO, "loss": "espo"}
    pg = init_parallel(rank, world_size, workdir / "rendezvous", **layout)
    try:
        def trainer(weights: Any) -> tuple[Any, Any]:
            model = build_gpt_chunks(hf.config, pg, **layout, **stages, dtype=dtype,
                                     sequence_parallel=tp > 1)
            load_hf_weights(model, weights.state_dict(), hf.config)
            return model, MegatronTrainer(model, algorithm=algorithm, train=TRAIN,
                                          vocab_size=int(hf.config.vocab_size),
                                          total_optimizer_steps=TOTAL_STEPS)

        model_a, a = trainer(hf)
        a.step(first, epochs=EPOCHS, seed=SEED)
        ckpt = workdir / "checkpoint"
        ckpt.mkdir(exist_ok=True)
        a.save_checkpoint(ckpt)
        a.step(second, epochs=EPOCHS, seed=SEED + 1)
        model_b, b = trainer(tiny_hf_policy(seed=3, layers=layers))
        b.load_checkpoint(ckpt)
        steps_after_load = b.optimizer_steps
        b.step(second, epochs=EPOCHS, seed=SEED + 1)
        return {"a": megatron_to_hf(gather_full_state_dict(model_a), hf.config),
                "b": megatron_to_hf(gather_full_state_dict(model_b), hf.config),
                "steps_after_load": steps_after_load, "steps": b.optimizer_steps}
    finally:
        destroy_parallel()


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    rank, world_size, tp, ep = (int(a) for a in argv[:4])
    workdir, replay, loss = Path(argv[4]), argv[5], argv[6]
    options = dict(a.split("=", 1) for a in argv[7:] if "=" in a)
    unknown = options.keys() - LAYOUT.keys()
    if unknown:
        raise SystemExit(f"unknown options {sorted(unknown)} (known: {sorted(LAYOUT)})")
    rest = [a for a in argv[7:] if "=" not in a]
    pp = int(rest[0]) if rest else 1
    recompute = rest[1] if len(rest) > 1 else "none"
    torch.set_num_threads(1)
    out = (run_resume(rank, world_size, tp, ep, workdir, pp, options) if replay == "resume"
           else run(rank, world_size, tp, ep, workdir, replay, loss, pp, recompute, options))
    torch.save(out, workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
