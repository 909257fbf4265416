"""The Megatron-LM command line of ``jobs/rl/train.sh``: parsed, checked, turned into settings.

``templates/rl/train.sh.j2`` renders the trainer's layout, model, optimizer and checkpoint
paths as Megatron-LM flags (the names an operator of Megatron-LM knows, so a bundle reads
like a Megatron launch and a flag can be edited in place to try a change). This module is
their one reader:

* :func:`megatron_parser` knows exactly the flags the template can render: an unknown or
  renamed flag is an error here, and a test parses every rendered example against it;
* :func:`check_architecture` compares the model flags with the HF config of the checkpoint
  the run starts from (a checkpoint's shape cannot be changed by a flag): any difference is
  one error listing each flag, its value and the checkpoint's;
* :func:`train_settings` gives the ``train`` section ``runtime.trainer.Trainer`` takes, with
  the batch and optimizer values of the flags.

Flags accepted but not applied by the engine (it builds megatron-core's local,
non-TransformerEngine modules): ``--moe-grouped-gemm`` (local experts are sequential),
``--use-precision-aware-optimizer`` (Megatron-LM asks for it with ``--optimizer-cpu-offload``;
megatron-core 0.16.1 needs TransformerEngine for it, so the fp32 main weights stay on the GPU),
``--tokenizer-*`` (the tokenizer is the HF checkpoint's), ``--position-embedding-type``,
``--normalization``, ``--swiglu``, ``--disable-bias-linear`` (every family: RMSNorm, SwiGLU, no
linear bias). The family-dependent attention flags are checked against the checkpoint's
config: ``--qk-layernorm`` (Qwen3, Qwen3-MoE, DeepSeek-V3's MLA norms; GLM-4.5 with
``use_qk_norm``), ``--add-qkv-bias`` (GLM-4.5's ``attention_bias``), ``--rotary-percent``
(GLM-4.5's ``partial_rotary_factor``, 0.5).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MegatronArgsError", "bias_update_rate", "check_architecture", "hf_moe_layers",
           "hf_num_experts", "hf_qk_norm", "hf_rope_theta", "hf_rotary_percent",
           "megatron_parser", "model_overrides", "parse_megatron_args",
           "pipeline_stages", "train_settings"]


class MegatronArgsError(ValueError):
    """A flag of train.sh that cannot be applied (unknown, malformed or contradicting)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the process
        raise MegatronArgsError(f"train.sh Megatron flags: {message}")


def megatron_parser(checkpoints: bool = True) -> argparse.ArgumentParser:
    """Every flag ``templates/rl/train.sh.j2`` renders, with Megatron-LM's names and types."""
    p = _Parser(prog="runtime.jobs.train", add_help=False, allow_abbrev=False)
    p.add_argument("--config", required=True)
    # parallel layout
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--num-virtual-stages-per-pipeline-rank", type=int)
    p.add_argument("--decoder-first-pipeline-num-layers", type=int)
    p.add_argument("--decoder-last-pipeline-num-layers", type=int)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int)
    # model
    for name in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--seq-length", "--max-position-embeddings"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--group-query-attention", action="store_true")
    p.add_argument("--num-query-groups", type=int)
    p.add_argument("--kv-channels", type=int)
    p.add_argument("--multi-latent-attention", action="store_true")
    for name in ("--q-lora-rank", "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim",
                 "--v-head-dim"):
        p.add_argument(name, type=int)
    p.add_argument("--position-embedding-type", choices=["rope"], default="rope")
    p.add_argument("--rotary-base", type=int, default=10000)
    p.add_argument("--rotary-percent", type=float, default=1.0)
    p.add_argument("--qk-layernorm", action="store_true")
    p.add_argument("--add-qkv-bias", action="store_true")
    p.add_argument("--normalization", choices=["RMSNorm"], default="RMSNorm")
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--disable-bias-linear", action="store_true")
    p.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    p.add_argument("--tokenizer-type")
    p.add_argument("--tokenizer-model")
    # MoE
    p.add_argument("--num-experts", type=int)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-ffn-hidden-size", type=int)
    p.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"],
                   default="softmax")
    p.add_argument("--moe-router-pre-softmax", action="store_true")
    p.add_argument("--moe-router-enable-expert-bias", action="store_true")
    p.add_argument("--moe-shared-expert-intermediate-size", type=int)
    p.add_argument("--moe-router-topk-scaling-factor", type=float)
    p.add_argument("--moe-router-num-groups", type=int)
    p.add_argument("--moe-router-group-topk", type=int)
    p.add_argument("--moe-layer-freq", type=_layer_freq, default=1)
    p.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    p.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"],
                   default="allgather")
    p.add_argument("--moe-grouped-gemm", action="store_true")
    p.add_argument("--moe-enable-routing-replay", action="store_true")
    # batch and optimizer
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, required=True)
    for name in ("--lr", "--min-lr", "--weight-decay", "--adam-beta1", "--adam-beta2",
                 "--adam-eps", "--clip-grad"):
        p.add_argument(name, type=float, required=True)
    p.add_argument("--lr-warmup-iters", type=int, default=0)
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--optimizer-cpu-offload", action="store_true")
    p.add_argument("--optimizer-offload-fraction", type=float, default=1.0)
    p.add_argument("--use-precision-aware-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--recompute-granularity", choices=["full", "selective"])
    p.add_argument("--recompute-method", choices=["uniform", "block"])
    p.add_argument("--recompute-num-layers", type=int)
    p.add_argument("--seed", type=int, default=1234)
    # checkpoints (the RL trainer's; the SFT job starts from the HF policy_init)
    p.add_argument("--load", required=checkpoints)
    p.add_argument("--save", required=checkpoints)
    return p


def _layer_freq(text: str) -> int | list[int]:
    """``--moe-layer-freq``: an int (every k-th layer is MoE) or the pattern the template
    writes, ``([0]*D+[1]*M)`` (D dense layers, then M MoE layers). Megatron-LM evaluates the
    string as Python; only this form is accepted here."""
    if text.strip().isdigit():
        return int(text)
    m = re.fullmatch(r"\(?\[0\]\*(\d+)\+\[1\]\*(\d+)\)?", text.replace(" ", ""))
    if not m:
        raise argparse.ArgumentTypeError(f"expected an int or ([0]*D+[1]*M), got {text!r}")
    return [0] * int(m.group(1)) + [1] * int(m.group(2))


def parse_megatron_args(argv: Sequence[str], *, checkpoints: bool = True) -> argparse.Namespace:
    """Parse the trainer's command line (``--config`` plus the Megatron flags);
    ``checkpoints``: ``--load`` and ``--save`` are required (the RL trainer)."""
    return megatron_parser(checkpoints).parse_args(list(argv))


def _moe_layers(args: argparse.Namespace) -> list[int]:
    freq = args.moe_layer_freq
    if isinstance(freq, list):
        return freq
    return [1 if i % freq == 0 else 0 for i in range(args.num_layers)]


def hf_rope_theta(cfg: Any) -> float:
    """RoPE base of an HF config (transformers 5's ``rope_parameters`` or 4's ``rope_theta``)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def hf_num_experts(cfg: Any) -> int:
    """Routed experts of an HF MoE config (Qwen3-MoE ``num_experts``, DeepSeek-V3 and GLM-4.5
    ``n_routed_experts``); 0 for a dense model (Qwen3, Llama)."""
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
    return int(experts or 0)


# HF families whose first ``first_k_dense_replace`` layers are dense (DeepSeek-V3's naming)
_FIRST_K_DENSE = ("deepseek_v3", "glm4_moe")


def hf_qk_norm(cfg: Any) -> bool:
    """Whether the attention normalises q and k per head (Megatron ``qk_layernorm``): Qwen3
    and Qwen3-MoE always, GLM-4.5 with ``use_qk_norm``, Llama never. (DeepSeek-V3's MLA
    sets its own: its q_a / kv_a norms.)"""
    if getattr(cfg, "model_type", None) in ("qwen3", "qwen3_moe", "deepseek_v3"):
        return True
    return bool(getattr(cfg, "use_qk_norm", False))


def hf_rotary_percent(cfg: Any) -> float:
    """The share of each head's dimensions RoPE rotates (Megatron ``rotary_percent``): HF's
    ``partial_rotary_factor`` (GLM-4.5: 0.5), 1 where the config has none."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None
    if factor is None:
        factor = getattr(cfg, "partial_rotary_factor", None)
    return float(1.0 if factor is None else factor)


def hf_moe_layers(cfg: Any) -> list[int]:
    """The HF layer pattern as Megatron's ``moe_layer_freq`` list (0 dense, 1 MoE). Qwen3-MoE:
    ``mlp_only_layers`` are dense, and of the rest every ``decoder_sparse_step``-th is MoE;
    DeepSeek-V3 and GLM-4.5: the first ``first_k_dense_replace`` layers are dense; a dense
    model (no experts): every layer."""
    if not hf_num_experts(cfg):
        return [0] * int(cfg.num_hidden_layers)
    if getattr(cfg, "model_type", None) in _FIRST_K_DENSE:
        dense_first = int(cfg.first_k_dense_replace or 0)
        return [0 if i < dense_first else 1 for i in range(int(cfg.num_hidden_layers))]
    dense = set(getattr(cfg, "mlp_only_layers", []) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    return [0 if (i in dense or (i + 1) % step) else 1 for i in range(int(cfg.num_hidden_layers))]


def check_architecture(args: argparse.Namespace, cfg: Any) -> None:
    """The model flags must describe the HF config ``cfg`` (Qwen3-MoE, Qwen3, Llama,
    DeepSeek-V3 or GLM-4.5) of the starting checkpoint; raises :class:`MegatronArgsError`
    listing every difference."""
    model_type = getattr(cfg, "model_type", None)
    mla = model_type == "deepseek_v3"
    if args.multi_latent_attention != mla:
        raise MegatronArgsError(
            f"--multi-latent-attention is {'set' if args.multi_latent_attention else 'not set'} "
            f"but the checkpoint is {model_type or '?'}: DeepSeek-V3 uses MLA, the other "
            "families grouped-query attention. Recompile the bundle from the spec that made "
            "the checkpoint")
    n = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    expected: dict[str, tuple[Any, Any]] = {
        "--num-layers": (args.num_layers, n),
        "--hidden-size": (args.hidden_size, int(cfg.hidden_size)),
        "--ffn-hidden-size": (args.ffn_hidden_size, int(cfg.intermediate_size)),
        "--num-attention-heads": (args.num_attention_heads, heads),
        "--num-query-groups": (args.num_query_groups if args.group_query_attention else heads,
                               int(cfg.num_key_value_heads)),
        "--max-position-embeddings": (args.max_position_embeddings,
                                      int(cfg.max_position_embeddings)),
        "--untie-embeddings-and-output-weights": (args.untie_embeddings_and_output_weights,
                                                  not bool(cfg.tie_word_embeddings)),
        "--qk-layernorm": (args.qk_layernorm, hf_qk_norm(cfg)),
        "--add-qkv-bias": (args.add_qkv_bias, bool(getattr(cfg, "attention_bias", False))),
        "--rotary-percent": (args.rotary_percent, hf_rotary_percent(cfg)),
        "--num-experts": (args.num_experts, hf_num_experts(cfg) or None),
    }
    if hf_num_experts(cfg):
        expected.update({
            "--moe-router-topk": (args.moe_router_topk, int(cfg.num_experts_per_tok)),
            "--moe-ffn-hidden-size": (args.moe_ffn_hidden_size, int(cfg.moe_intermediate_size)),
            "--moe-router-pre-softmax": (args.moe_router_pre_softmax,
                                         not bool(cfg.norm_topk_prob)),
            "--moe-layer-freq": (_moe_layers(args), hf_moe_layers(cfg)),
        })
    if mla:
        expected.update({
            "--q-lora-rank": (args.q_lora_rank, cfg.q_lora_rank),
            "--kv-lora-rank": (args.kv_lora_rank, int(cfg.kv_lora_rank)),
            "--qk-head-dim": (args.qk_head_dim, int(cfg.qk_nope_head_dim)),
            "--qk-pos-emb-head-dim": (args.qk_pos_emb_head_dim, int(cfg.qk_rope_head_dim)),
            "--v-head-dim": (args.v_head_dim, int(cfg.v_head_dim)),
        })
    if model_type in _FIRST_K_DENSE:  # DeepSeek-V3's router, shared experts (and GLM-4.5's)
        shared = int(cfg.n_shared_experts or 0) * int(cfg.moe_intermediate_size)
        expected.update({
            "--moe-router-score-function": (args.moe_router_score_function, "sigmoid"),
            "--moe-shared-expert-intermediate-size": (args.moe_shared_expert_intermediate_size,
                                                      shared or None),
            "--moe-router-topk-scaling-factor": (args.moe_router_topk_scaling_factor or 1.0,
                                                 float(cfg.routed_scaling_factor)),
            "--moe-router-num-groups": (args.moe_router_num_groups or 1, int(cfg.n_group or 1)),
            "--moe-router-group-topk": (args.moe_router_group_topk or 1,
                                        int(cfg.topk_group or 1)),
        })
    elif hf_num_experts(cfg):
        expected["--moe-router-score-function"] = (args.moe_router_score_function, "softmax")
    if args.kv_channels is not None and not mla:
        expected["--kv-channels"] = (args.kv_channels, int(cfg.head_dim))
    expected["--rotary-base"] = (float(args.rotary_base), hf_rope_theta(cfg))
    wrong = [f"{flag} {got} (the checkpoint has {want})"
             for flag, (got, want) in expected.items() if got != want]
    if wrong:
        raise MegatronArgsError(
            "train.sh's model flags do not describe the checkpoint the run starts from: "
            + "; ".join(wrong) + ". Recompile the bundle from the spec that made the checkpoint")


def bias_update_rate(args: argparse.Namespace) -> float:
    """The rate of the routers' selection-bias update (megatron-core's
    ``moe_router_bias_update_rate``): DeepSeek-V3's 1e-3 with
    ``--moe-router-enable-expert-bias`` (``moe.expert_bias: true``), else 0 (the bias, which
    a DeepSeek-V3 checkpoint always has, stays as the checkpoint's)."""
    return 1e-3 if args.moe_router_enable_expert_bias else 0.0


def pipeline_stages(pp: int, first: int | None, last: int | None) -> dict[str, int]:
    """``TransformerConfig`` fields of uneven pipeline stages (``--decoder-first/last-
    pipeline-num-layers``). With PP = 2 and both given, the first alone says the same (the
    last stage holds the rest), and is what is passed: megatron-core 0.16.1 divides by the
    number of middle stages when both are set under virtual pipeline stages, a
    ZeroDivisionError at PP = 2 (``get_transformer_layer_offset``)."""
    if pp == 2 and first and last:
        last = None
    return {f"num_layers_in_{name}_pipeline_stage": value
            for name, value in (("first", first), ("last", last)) if value}


def train_settings(args: argparse.Namespace, train: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's ``train`` section with the batch and optimizer values of the flags."""
    return {
        **train,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "seed": args.seed,
        "optimizer": {
            **train["optimizer"],
            "lr": args.lr, "min_lr": args.min_lr, "weight_decay": args.weight_decay,
            "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
            "adam_eps": args.adam_eps, "clip_grad": args.clip_grad,
            "warmup_steps": args.lr_warmup_iters,
            "distributed": args.use_distributed_optimizer,
            "cpu_offload": args.optimizer_cpu_offload,
            "offload_fraction": args.optimizer_offload_fraction,
        },
    }


def model_overrides(args: Any) -> dict[str, Any]:
    """The ``TransformerConfig`` fields the Megatron trainer takes from train.sh's flags
    (``runtime.megatron.model.transformer_config``'s overrides): sequence parallelism, the
    token dispatcher (the CPU runs allgather only: the megatron_cpu rule refuses others),
    uneven pipeline stages, DeepSeek-V3's bias update rate and activation recomputation
    (``train.recompute``)."""
    overrides: dict[str, Any] = {"sequence_parallel": args.sequence_parallel,
                                 "moe_token_dispatcher_type": args.moe_token_dispatcher_type,
                                 **pipeline_stages(args.pipeline_model_parallel_size,
                                                   args.decoder_first_pipeline_num_layers,
                                                   args.decoder_last_pipeline_num_layers)}
    overrides["moe_router_bias_update_rate"] = bias_update_rate(args)  # DeepSeek-V3's bias
    if args.context_parallel_size > 1:  # runtime.megatron.context_parallel
        overrides["context_parallel_size"] = args.context_parallel_size
    if args.recompute_granularity:
        overrides.update(recompute_granularity=args.recompute_granularity,
                         recompute_method=args.recompute_method,
                         recompute_num_layers=args.recompute_num_layers)
    return overrides
