"""compiler.plan: derived values of the examples and recipes, parameter counts, totality."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.checks import check
from compiler.estimates import (
    TrainLayout,
    attention_score_elements,
    count_params,
    kv_bytes_per_token,
    local_attention_bytes,
    train_memory,
)
from compiler.plan import Plan, make_plan, pipeline_split
from spec.loader import load_spec
from spec.models import Architecture
from tests.compiler.conftest import DELETE, EXAMPLES, RECIPES, build


def plan_of(path: Any) -> Plan:
    return make_plan(load_spec(path).spec)


# --------------------------------------------------------------------------- examples


def test_tiny_example() -> None:
    plan = plan_of(EXAMPLES / "tiny" / "spec.yaml")
    assert (plan.train_world_size, plan.data_parallel, plan.expert_data_parallel) == (1, 1, 1)
    assert plan.pipeline_layers == (2,)
    assert plan.micro_batches_per_step == 8  # 128 / (16 × 1)
    assert plan.rollouts_per_step == 128 and plan.optimizer_steps_per_rollout == 1
    assert (plan.gpus_per_replica, plan.rollout_replicas, plan.rl_nodes) == (1, 1, 2)
    assert plan.seq_len == 24
    assert (plan.routing_dtype, plan.routing_bytes_per_token) == ("uint8", 2 * 2 * 1)
    # 0.51 M parameters, norms not counted: embedding and output 2 × 64 × 128; per layer
    # attention q, o 128 × 128, k, v 128 × 64 (head_dim 32: 2 KV heads), router 128 × 8, and
    # 8 experts of 3 × 128 × 64.
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 128 * 8 + 8 * 3 * 128 * 64
    assert plan.params.total == 2 * 64 * 128 + 2 * per_layer == 509_952
    assert plan.params.moe_layers == 2
    assert plan.train_memory.notes == ("cpu run: not estimated",)
    assert plan.rollout_max_sequences == -1
    screen, adaptive, shaping, flat, history = plan.stage_budgets
    assert screen.one_time_rollouts == 10000 * 8  # train prompts × k × cost 1 / 1 epoch
    assert screen.rollouts_per_step == 80000 / 1000  # amortised over train.steps
    assert adaptive.worst_case_rollouts_per_step == 0.5 * 128  # (budget 1.5 − 1) × 16 × 8
    assert shaping.rollouts_per_step == flat.rollouts_per_step == history.rollouts_per_step == 0
    assert plan.expected_rollouts_per_step == 128 + 80 + 64


def test_embedded_trainer_is_one_rank_whatever_the_node_holds() -> None:
    """The embedded trainer is one process on one device: a node with 3 GPUs does not make DP 3
    (the tiny example's global batch 128 is not a multiple of 16 × 3 and still validates)."""
    spec = load_spec(EXAMPLES / "tiny" / "spec.yaml", overrides=["cluster.gpus_per_node=3"]).spec
    plan = make_plan(spec)
    assert (plan.train_world_size, plan.data_parallel, plan.micro_batches_per_step) == (1, 1, 8)
    assert not [p for p in check(spec, plan) if p.severity == "error"]


def test_single_node_example() -> None:
    plan = plan_of(EXAMPLES / "qwen3-30b-a3b.yaml")
    assert (plan.train_world_size, plan.data_parallel, plan.expert_data_parallel) == (16, 4, 2)
    assert plan.expert_tensor_parallel == 1 and not plan.expert_tensor_defaulted
    assert plan.micro_batches_per_step == 32
    assert (plan.gpus_per_replica, plan.rollout_replicas, plan.rollout_expert_parallel) == (8, 1, 8)
    assert plan.optimizer_steps_per_rollout == 4  # 64 × 8 / 128
    assert plan.rl_nodes == 3
    drop = next(b for b in plan.stage_budgets if b.type == "flat_groups")
    assert drop.rollouts_per_step == 0.5 * 512  # oversample 1.5
    assert drop.worst_case_rollouts_per_step == (1.5 * 2 - 1) * 512  # 2 rounds
    assert drop.can_fill_batch_worst_case  # fallback keep
    assert plan.train_memory.total_gb < 0.9 * 80


def test_compassmax_245b_example() -> None:
    plan = plan_of(EXAMPLES / "compassmax-245b.yaml")
    assert (plan.train_world_size, plan.data_parallel, plan.expert_data_parallel) == (128, 4, 2)
    assert plan.pipeline_layers == (8,) * 8
    assert plan.micro_batches_per_step == 256
    assert (plan.gpus_per_replica, plan.rollout_replicas, plan.rollout_expert_parallel) == (16, 4, 16)
    assert plan.optimizer_steps_per_rollout == 4 and plan.rl_nodes == 24
    assert plan.seq_len == 32768  # 2048 prompt + 30720 response tokens
    # 16 experts → uint8 ids; 64 MoE layers × top-4 × 1 byte.
    assert (plan.routing_dtype, plan.routing_bytes_per_token) == ("uint8", 256)
    assert plan.params.total == pytest.approx(245e9, rel=0.005)
    assert plan.params.active == pytest.approx(71e9, rel=0.005)
    assert 0.5 * 80 < plan.train_memory.total_gb < 0.9 * 80
    assert plan.rollout_memory.total_gb < 0.9 * plan.rollout_memory.capacity_gb
    assert plan.rollout_max_sequences > 0
    screen = plan.stage_budgets[0]
    assert screen.one_time_rollouts == 0 and "unknown" in screen.notes[0]


# --------------------------------------------------------------------------- recipes


def test_deepseek_v3_uneven_pipeline() -> None:
    plan = plan_of(RECIPES / "deepseek-v3.yaml")
    assert plan.pipeline_layers == (4, *(4,) * 14, 1)
    assert sum(plan.pipeline_layers) == 61
    assert (plan.train_world_size, plan.data_parallel, plan.expert_data_parallel) == (1024, 64, 1)
    assert plan.expert_tensor_defaulted and plan.expert_tensor_parallel == 1


def test_qwen3_235b_last_stage_only() -> None:
    plan = plan_of(RECIPES / "qwen3-235b-a22b.yaml")
    assert plan.pipeline_layers == (24, 24, 24, 22)
    assert (plan.data_parallel, plan.expert_data_parallel) == (2, 1)  # 64 / (4·4·2), 64 / (1·16·4)


def test_qwen3_30b_eplb_rollout_holds_its_redundant_experts() -> None:
    plan = plan_of(RECIPES / "qwen3-30b-a3b-eplb.yaml")
    assert (plan.gpus_per_replica, plan.rollout_expert_parallel, plan.nodes_per_replica) == (24, 24, 3)
    # 144 physical experts (128 + 16 redundant) over EP 24, the rest over TP 8, in bf16.
    p = plan.params
    weights = 2 * (p.non_expert / 8 + p.expert * 144 / 128 / 24) / 1e9
    assert plan.rollout_memory.parts["weights"] == pytest.approx(weights)
    without = make_plan(load_spec(RECIPES / "qwen3-30b-a3b-eplb.yaml",
                                  ["rollout.redundant_experts=0"]).spec)
    extra = plan.rollout_memory.parts["weights"] - without.rollout_memory.parts["weights"]
    assert extra == pytest.approx(2 * p.expert * 16 / 128 / 24 / 1e9)


@pytest.mark.parametrize(("layers", "pp", "first", "last", "split"), [
    (48, 4, None, None, (12, 12, 12, 12)),
    (61, 16, 4, 1, (4, *(4,) * 14, 1)),
    (61, 4, None, 13, (16, 16, 16, 13)),
    (61, 4, 1, None, (1, 20, 20, 20)),
    (40, 2, 20, 20, (20, 20)),
    (10, 1, None, None, (10,)),
    (50, 4, None, None, (12, 12, 12, 12)),  # does not divide: checks report it
    (10, 4, 8, 8, (8, 0, 0, 8)),  # over-full ends: never negative
])
def test_pipeline_split(layers: int, pp: int, first: int | None, last: int | None,
                        split: tuple[int, ...]) -> None:
    assert pipeline_split(layers, pp, first, last) == split


# --------------------------------------------------------------------------- parameter counts

QWEN3_30B = {"family": "qwen3_moe", "num_layers": 48, "hidden_size": 2048,
             "ffn_hidden_size": 6144, "num_attention_heads": 32, "num_query_groups": 4,
             "head_dim": 128, "vocab_size": 151936,
             "moe": {"num_experts": 128, "top_k": 8, "expert_ffn_hidden_size": 768}}
DEEPSEEK_V3 = {"family": "deepseek_v3", "num_layers": 61, "hidden_size": 7168,
               "ffn_hidden_size": 18432, "num_attention_heads": 128, "attention": "mla",
               "mla": {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_head_dim": 128,
                       "qk_pos_emb_head_dim": 64, "v_head_dim": 128},
               "vocab_size": 129280,
               "moe": {"num_experts": 256, "top_k": 8, "expert_ffn_hidden_size": 2048,
                       "shared_experts": 1, "first_dense_layers": 3}}


@pytest.mark.parametrize(("arch", "total", "active"), [
    (QWEN3_30B, 30.5e9, 3.3e9),  # Qwen3-30B-A3B model card
    (DEEPSEEK_V3, 671e9, 37e9),  # DeepSeek-V3 report (without the 14 B MTP module)
])
def test_param_counts_match_published_totals(arch: dict, total: float, active: float) -> None:
    # Norms and biases are ignored: totals within 1 %, active counts within 3 %
    # (published active counts round down, e.g. 3.35 B → "3.3 B", 37.5 B → "37 B").
    params = count_params(Architecture.model_validate(arch))
    assert params.total == pytest.approx(total, rel=0.01)
    assert params.active == pytest.approx(active, rel=0.03)
    assert params.total == params.expert + params.non_expert


@pytest.mark.parametrize(("recipe", "total", "active"), [
    ("qwen3-235b-a22b.yaml", 235e9, 22e9),
    ("glm-4.5.yaml", 355e9, 32e9),  # 355 B includes the MTP layer, not modelled
    ("moonlight-16b-a3b.yaml", 16e9, 3e9),
])
def test_recipe_param_counts(recipe: str, total: float, active: float) -> None:
    params = plan_of(RECIPES / recipe).params
    assert params.total == pytest.approx(total, rel=0.015)
    assert params.active == pytest.approx(active, rel=0.06)


def test_dense_model_has_no_experts_and_no_routing() -> None:
    plan = make_plan(build({"model.architecture.moe": DELETE, "router_replay.mode": "r3"}))
    assert plan.params.expert == 0 and plan.params.moe_layers == 0
    assert plan.params.active == plan.params.total
    assert (plan.routing_dtype, plan.routing_bytes_per_token) == (None, 0)


def test_tied_embeddings_count_once() -> None:
    untied = make_plan(build()).params
    tied = make_plan(build({"model.architecture.tie_embeddings": True})).params
    assert untied.embedding - tied.embedding == 151936 * 2048


def test_routing_ids_are_int16_above_256_experts() -> None:
    plan = make_plan(build({"model.architecture.moe.num_experts": 384, "router_replay.mode": "r3"}))
    assert (plan.routing_dtype, plan.routing_bytes_per_token) == ("int16", 48 * 8 * 2)
    assert make_plan(build()).routing_bytes_per_token == 0  # replay off


def test_kv_cache_per_token() -> None:
    arch = Architecture.model_validate(QWEN3_30B)
    # 4 KV heads: TP 2 holds 2 per GPU; TP 8 replicates to 1 per GPU.
    assert kv_bytes_per_token(arch, 2) == 2 * 48 * 2 * 128 * 2
    assert kv_bytes_per_token(arch, 8) == 2 * 48 * 1 * 128 * 2
    mla = Architecture.model_validate(DEEPSEEK_V3)
    assert kv_bytes_per_token(mla, 8) == (512 + 64) * 61 * 2


def test_optimizer_state_shards_over_expert_dp() -> None:
    one = make_plan(build({"train.nodes": 1}))
    two = make_plan(build({"train.nodes": 2}))
    assert (one.expert_data_parallel, two.expert_data_parallel) == (1, 2)
    assert two.train_memory.parts["optimizer"] < 0.55 * one.train_memory.parts["optimizer"]
    assert two.train_memory.parts["weights"] == one.train_memory.parts["weights"]


def test_full_recompute_keeps_less_than_selective() -> None:
    full = make_plan(build()).train_memory.parts["activations"]
    sel = make_plan(build({"train.recompute": "selective"})).train_memory.parts["activations"]
    assert full < sel


# --------------------------------------------------------------------------- totality

sizes = st.integers(min_value=1, max_value=16)
optional_layers = st.none() | st.integers(min_value=1, max_value=60)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.integers(1, 8), gpn=st.integers(1, 8), tp=sizes, pp=sizes, cp=st.integers(1, 4),
    ep=sizes, etp=st.none() | st.integers(1, 8), vpp=st.none() | st.integers(1, 4),
    first=optional_layers, last=optional_layers, sp=st.booleans(),
    micro=st.integers(1, 8), gbs=st.integers(1, 512), prompts=st.integers(1, 64),
    n=st.integers(1, 16), r_nodes=st.integers(1, 4), r_tp=sizes, r_dp=st.integers(1, 8),
    r_ep=st.booleans(), cpu=st.booleans(), dense=st.booleans(),
    filters=st.lists(st.sampled_from(["adaptive_group_size", "reward_shaping", "flat_groups",
                                      "history"]), unique=True),
)
def test_make_plan_and_check_never_raise(
    nodes: int, gpn: int, tp: int, pp: int, cp: int, ep: int, etp: int | None,
    vpp: int | None, first: int | None, last: int | None, sp: bool, micro: int, gbs: int,
    prompts: int, n: int, r_nodes: int, r_tp: int, r_dp: int, r_ep: bool, cpu: bool,
    dense: bool, filters: list[str],
) -> None:
    stages = [{"type": "flat_groups", "action": "drop"} if f == "flat_groups" else {"type": f}
              for f in filters]
    if "flat_groups" in filters and "reward_shaping" in filters:  # shaping must come first
        stages.sort(key=lambda s: s["type"] != "reward_shaping")
    spec = build({
        "train.nodes": nodes, "cluster.gpus_per_node": gpn, "cluster.devices": "cpu" if cpu else "gpu",
        "train.parallelism": {"tensor": tp, "pipeline": pp, "context": cp, "expert": ep,
                              "expert_tensor": etp, "virtual_pipeline": vpp,
                              "first_pipeline_stage_layers": first,
                              "last_pipeline_stage_layers": last, "sequence_parallel": sp},
        "train.micro_batch_size": micro, "train.global_batch_size": gbs,
        "rollout.prompts_per_step": prompts, "rollout.n": n, "rollout.nodes": r_nodes,
        "rollout.parallelism": {"tensor": r_tp, "data": r_dp, "expert_parallel": r_ep},
        "model.architecture.moe": DELETE if dense else {"num_experts": 128, "top_k": 8,
                                                        "expert_ffn_hidden_size": 768},
        "filters": stages,
    })
    plan = make_plan(spec)
    assert len(plan.pipeline_layers) == pp
    assert plan.data_parallel == nodes * gpn // (tp * pp * cp)
    assert all(b.worst_case_rollouts_per_step >= b.rollouts_per_step >= 0
               for b in plan.stage_budgets)
    for problem in check(spec, plan):
        assert problem.path and problem.message


# --------------------------------------------------------------------------- attention, offload


def test_local_attention_score_matrix_at_10k_tokens_and_32_heads() -> None:
    # megatron-core's unfused DotProductAttention: [1, 32, 10240, 10240] bf16 scores = 6.7 GB;
    # kept per layer without recomputation (fp32 softmax + its bf16 copy) and while it runs.
    elements = attention_score_elements(10240, 1, 32, 1, 1)
    assert 2 * elements == pytest.approx(6.71e9, rel=1e-3)
    kept, working = local_attention_bytes(10240, 1, 32, 1, 1, "bf16")
    assert (kept, working) == (6 * elements, 14 * elements)
    assert local_attention_bytes(10240, 1, 32, 4, 1, "bf16")[1] == working / 4  # heads / TP
    assert local_attention_bytes(10240, 1, 32, 1, 1, "fp32") == (4 * elements, 12 * elements)


def _local_layout(**edits: Any) -> TrainLayout:
    base = dict(tp=1, pp=1, cp=1, ep=1, etp=1, dp=1, expert_dp=1, vpp=1,
                sequence_parallel=False, pipeline_layers=(1,), micro_batches=1,
                micro_batch_size=1, seq_len=10240, precision="bf16", recompute="selective",
                distributed_optimizer=True, attention="local", heads=32)
    return TrainLayout(**{**base, **edits})  # type: ignore[arg-type]


def test_the_megatron_estimate_counts_its_local_attention() -> None:
    arch = Architecture.model_validate({**QWEN3_30B, "num_layers": 1})
    elements = attention_score_elements(10240, 1, 32, 1, 1)
    mask = 10240 * 10240  # the boolean [1, 1, s, s] mask of the micro-batch
    selective = train_memory(arch, _local_layout(), 80.0)
    assert selective.parts["attention"] * 1e9 == pytest.approx(14 * elements + mask)
    assert "local attention" in selective.notes[2] and "6.71 GB score matrix" in selective.notes[2]
    kept = train_memory(arch, _local_layout(recompute="none"), 80.0)
    assert kept.parts["attention"] * 1e9 == pytest.approx(6 * elements + 8 * elements + mask)
    flash = train_memory(arch, _local_layout(attention="flash"), 80.0)
    assert "attention" not in flash.parts


def test_the_megatron_trainers_sdpa_attention_keeps_no_scores() -> None:
    """The Megatron trainer's core attention is torch SDPA (runtime.megatron.attention): on
    GPUs no score matrix kept or at peak, and no mask for its right-padded batches — the same
    estimate as flash attention, the 14 + 1 B per score element of local attention gone."""
    arch = Architecture.model_validate({**QWEN3_30B, "num_layers": 1})
    sdpa = train_memory(arch, _local_layout(attention="sdpa"), 80.0)
    flash = train_memory(arch, _local_layout(attention="flash"), 80.0)
    assert "attention" not in sdpa.parts and sdpa.total_gb == flash.total_gb
    assert any("torch SDPA" in note and "no score matrix" in note for note in sdpa.notes)
    estimate = make_plan(build()).train_memory
    assert "attention" not in estimate.parts
    assert any("torch SDPA" in note for note in estimate.notes)


def test_optimizer_offload_moves_the_moments_to_the_host() -> None:
    plain = make_plan(build()).train_memory
    offload = make_plan(build({"train.optimizer.cpu_offload": True})).train_memory
    half = make_plan(build({"train.optimizer.cpu_offload": True,
                            "train.optimizer.offload_fraction": 0.5})).train_memory
    # bf16: the fp32 main-weight shards (4 of 12 B) stay on the GPU, m and v (8 B) leave it
    assert offload.parts["optimizer"] == pytest.approx(plain.parts["optimizer"] * 4 / 12)
    assert half.parts["optimizer"] == pytest.approx(plain.parts["optimizer"] * 8 / 12)
    host = plain.parts["optimizer"] * 16 / 12
    assert f"optimizer CPU offload 1: {host:.1f} GB" in offload.notes[-1]
    assert {k: v for k, v in offload.parts.items() if k != "optimizer"} == {
        k: v for k, v in plain.parts.items() if k != "optimizer"}
