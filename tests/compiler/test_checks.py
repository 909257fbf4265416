"""compiler.checks: one test per rule with a spec that breaks it (path, numbers, severity)."""

from __future__ import annotations

from typing import Any

import pytest

from compiler.checks import RULES, check, checked_plan, unused_settings
from compiler.plan import make_plan
from spec.errors import Problem, SpecError
from spec.loader import load_spec
from tests.compiler.conftest import DELETE, EXAMPLES, build, errors_of, problems_of

TP = ("train", "parallelism", "tensor")
PP = ("train", "parallelism", "pipeline")
CP = ("train", "parallelism", "context")
EP = ("train", "parallelism", "expert")
ETP = ("train", "parallelism", "expert_tensor")
SP = ("train", "parallelism", "sequence_parallel")
VPP = ("train", "parallelism", "virtual_pipeline")
FIRST = ("train", "parallelism", "first_pipeline_stage_layers")
LAST = ("train", "parallelism", "last_pipeline_stage_layers")
R_PAR = ("rollout", "parallelism")
R_TP = ("rollout", "parallelism", "tensor")
R_EP = ("rollout", "parallelism", "expert_parallel")
MEM = ("cluster", "gpu_memory_gb")
ARCH = "model.architecture"
MOE = "model.architecture.moe"
DENSE = {MOE: DELETE, "rollout.parallelism.expert_parallel": False,
         "train.parallelism.expert": 1, "train.parallelism.expert_tensor": DELETE}
CPU_LOCAL = {"cluster.devices": "cpu", "cluster.scheduler": "local"}


def only(edits: dict[str, Any], path: tuple, severity: str = "error") -> Problem:
    """The one problem at `path` of the base spec with `edits`, of the given severity."""
    found = [p for p in problems_of(build(edits)) if p.path == path]
    assert len(found) == 1, [p.format() for p in problems_of(build(edits))]
    assert found[0].severity == severity, found[0].format()
    return found[0]


def assert_numbers(problem: Problem, *numbers: object) -> None:
    for n in numbers:
        assert str(n) in problem.message, (n, problem.message)


def paths(edits: dict[str, Any]) -> set[tuple]:
    return {p.path for p in problems_of(build(edits))}


# --------------------------------------------------------------------------- valid specs


def test_base_spec_has_no_problems() -> None:
    assert problems_of(build()) == []


def test_checked_plan_attaches_warnings_and_raises_errors() -> None:
    plan = checked_plan(build({"cluster.partition": DELETE}))
    assert [w.path for w in plan.warnings] == [("cluster", "partition")]
    with pytest.raises(SpecError) as info:
        checked_plan(build({"train.parallelism.context": 3}))
    assert all(p.severity == "error" for p in info.value.problems)


def test_every_rule_names_related_fields_and_suggests_a_fix() -> None:
    broken = build({"train.parallelism.context": 3, "train.parallelism.expert": 6,
                    "rollout.prompts_per_step": 30, "rollout.parallelism.tensor": 3})
    problems = check(broken, make_plan(broken))
    assert len(problems) >= 5
    for p in problems:
        assert p.related, p.format()
        assert p.suggestion, p.format()
    assert len(RULES) >= 13


# --------------------------------------------------------------------------- training grid


def test_world_size_not_a_multiple_of_tp_pp_cp() -> None:
    p = only({"train.parallelism.context": 3}, ("train", "parallelism"))
    assert_numbers(p, "world size 16", "2·1·3 = 6")
    assert ("train", "nodes") in p.related and CP in p.related
    assert "train.nodes: 3" in p.suggestion


# --------------------------------------------------------------------------- expert grid


def test_expert_grid_with_defaulted_etp_suggests_etp_1() -> None:
    p = only({"train.parallelism.expert_tensor": DELETE, "train.nodes": 1}, EP)
    assert_numbers(p, "world size 8", "2·8·1 = 16", "ETP = TP = 2")
    assert p.suggestion == "set train.parallelism.expert_tensor: 1"
    # The error explains the default; no second (warning) problem repeats it.
    assert ETP not in paths({"train.parallelism.expert_tensor": DELETE, "train.nodes": 1})


def test_expert_grid_with_explicit_etp_suggests_sizes() -> None:
    p = only({"train.parallelism.expert_tensor": 2, "train.nodes": 1}, EP)
    assert_numbers(p, "2·8·1 = 16")
    assert "train.parallelism.expert: 4" in p.suggestion


def test_defaulted_etp_with_tp_above_1_is_a_warning_even_when_it_fits() -> None:
    p = only({"train.parallelism.expert_tensor": DELETE}, ETP, "warning")
    assert_numbers(p, "ETP = TP = 2", "2·8·1 = 16")
    assert "expert_tensor: 1" in p.suggestion
    assert not errors_of(build({"train.parallelism.expert_tensor": DELETE}))


def test_defaulted_etp_with_tp_1_is_silent() -> None:
    assert ETP not in paths({"train.parallelism.expert_tensor": DELETE,
                             "train.parallelism.tensor": 1,
                             "train.parallelism.sequence_parallel": False})


def test_num_experts_not_a_multiple_of_ep() -> None:
    p = [q for q in errors_of(build({"train.parallelism.expert": 6})) if "num_experts" in q.message]
    assert len(p) == 1 and p[0].path == EP
    assert_numbers(p[0], 128, 6)
    assert "expert: 4 or 8" in p[0].suggestion


def test_expert_parallel_on_a_dense_model() -> None:
    p = only({**DENSE, "train.parallelism.expert": 2}, EP)
    assert_numbers(p, 2)


def test_expert_tensor_on_a_dense_model() -> None:
    p = only({**DENSE, "train.parallelism.expert_tensor": 2}, ETP)
    assert_numbers(p, 2)


def test_expert_ffn_not_a_multiple_of_etp() -> None:
    p = only({f"{MOE}.expert_ffn_hidden_size": 769, "train.parallelism.expert_tensor": 2,
              "train.parallelism.expert": 4}, ETP)
    assert_numbers(p, 769, 2)


# --------------------------------------------------------------------------- attention / TP


def test_heads_not_a_multiple_of_tp() -> None:
    problems = [p for p in errors_of(build({f"{ARCH}.num_attention_heads": 36,
                                            "train.parallelism.tensor": 8})) if p.path == TP]
    heads = [p for p in problems if "num_attention_heads" in p.message]
    assert len(heads) == 1
    assert_numbers(heads[0], 36, 8)
    assert "1, 2, 4" in heads[0].suggestion


def test_query_groups_not_a_multiple_of_tp() -> None:
    p = only({"train.parallelism.tensor": 8}, TP)
    assert_numbers(p, "num_query_groups 4", 8)


def test_mla_model_has_no_query_group_rule() -> None:
    mla = {f"{ARCH}.attention": "mla", f"{ARCH}.num_query_groups": DELETE,
           f"{ARCH}.mla": {"kv_lora_rank": 512}, "train.parallelism.tensor": 8}
    assert TP not in paths(mla)


def test_dense_ffn_not_a_multiple_of_tp() -> None:
    p = only({f"{MOE}.first_dense_layers": 1, f"{ARCH}.ffn_hidden_size": 6145}, TP)
    assert_numbers(p, 6145, 2)


def test_shared_expert_ffn_not_a_multiple_of_tp() -> None:
    p = only({f"{MOE}.shared_experts": 1, f"{MOE}.shared_expert_ffn_hidden_size": 1025}, TP)
    assert_numbers(p, 1025, 2)


# --------------------------------------------------------------------------- Qwen3 head_dim


def test_a_qwen3_checkpoint_without_head_dim_is_an_error() -> None:
    """Qwen3-30B-A3B without head_dim: 2048 / 32 = 64, not Qwen3's 128; the plan would say
    30.08 B / 2.90 B parameters instead of 30.53 B / 3.35 B."""
    spec = build({f"{ARCH}.head_dim": DELETE})
    assert round(make_plan(spec).params.total / 1e9, 2) == 30.08
    (p,) = errors_of(spec)
    assert p.path == ("model", "architecture", "head_dim")
    assert "2048 / 32 = 64" in p.message and "128" in p.message
    assert p.suggestion.startswith("set model.architecture.head_dim")
    assert round(make_plan(build()).params.total / 1e9, 2) == 30.53  # head_dim 128 written
    assert round(make_plan(build()).params.active / 1e9, 2) == 3.35


@pytest.mark.parametrize("edits", [
    {"model.checkpoint": None},  # initialised from scratch: no checkpoint to disagree with
    {f"{ARCH}.hidden_size": 4096},  # 4096 / 32 = 128 anyway (Qwen3-8B)
    {f"{ARCH}.family": "llama"},  # llama derives head_dim from hidden / heads
], ids=["no-checkpoint", "derived-128", "llama"])
def test_head_dim_may_be_left_out_where_the_default_is_right(edits) -> None:
    spec = build({f"{ARCH}.head_dim": DELETE, **edits})
    assert not [p for p in errors_of(spec) if p.path[-1] == "head_dim"]


# --------------------------------------------------------------------------- pipeline

PP4 = {"train.parallelism.pipeline": 4, "train.parallelism.expert": 4}


def test_layers_not_a_multiple_of_pp_suggests_an_uneven_last_stage() -> None:
    p = only({**PP4, f"{ARCH}.num_layers": 50}, PP)
    assert_numbers(p, 50, 4)
    assert "last_pipeline_stage_layers: 11" in p.suggestion  # 50 = 3 × 13 + 11


def test_uneven_last_stage_that_splits_is_valid() -> None:
    # slime's DeepSeek-R1 split: 61 = 3 × 16 + 13.
    spec = build({**PP4, f"{ARCH}.num_layers": 61, "train.parallelism.last_pipeline_stage_layers": 13})
    assert errors_of(spec) == []
    assert make_plan(spec).pipeline_layers == (16, 16, 16, 13)


def test_uneven_stages_that_do_not_split() -> None:
    p = only({**PP4, "train.parallelism.last_pipeline_stage_layers": 10}, LAST)
    assert_numbers(p, 48, "last 10", "leaves 38", "3 middle")


def test_uneven_stages_with_two_stages_must_add_up() -> None:
    edits = {"train.parallelism.pipeline": 2, "train.parallelism.expert": 8,
             "train.parallelism.first_pipeline_stage_layers": 20,
             "train.parallelism.last_pipeline_stage_layers": 20}
    p = only(edits, FIRST)
    assert_numbers(p, 40, 48, "2 stages")


def test_uneven_stages_need_pipeline() -> None:
    p = only({"train.parallelism.first_pipeline_stage_layers": 4}, FIRST)
    assert "pipeline is 1" in p.message


def test_virtual_pipeline_needs_pipeline() -> None:
    p = only({"train.parallelism.virtual_pipeline": 2}, VPP)
    assert_numbers(p, "virtual_pipeline 2")


def test_virtual_pipeline_must_divide_every_stage() -> None:
    p = only({**PP4, "train.parallelism.virtual_pipeline": 5}, VPP)
    assert_numbers(p, "virtual_pipeline 5", "stage 0: 12")
    assert "2, 3, 4, 6, 12" in p.suggestion
    assert VPP not in paths({**PP4, "train.parallelism.virtual_pipeline": 3})


# --------------------------------------------------------------------------- sequence parallel


def test_moe_with_tp_needs_sequence_parallel() -> None:
    p = only({"train.parallelism.sequence_parallel": False}, SP)
    assert_numbers(p, "tensor parallel size 2")
    assert p.suggestion == "set train.parallelism.sequence_parallel: true"


def test_sequence_parallel_with_tp_1_is_a_warning() -> None:
    p = only({"train.parallelism.tensor": 1}, SP, "warning")
    assert "tensor parallel size 1" in p.message


def test_dense_model_with_tp_does_not_need_sequence_parallel() -> None:
    assert SP not in paths({**DENSE, "train.parallelism.sequence_parallel": False})


def test_sequence_parallel_pads_a_length_not_a_multiple_of_tp() -> None:
    # verl issue 3296: 514 prompt + 512 response tokens at TP 8.
    tp8 = {f"{ARCH}.num_query_groups": 8, "train.parallelism.tensor": 8,
           "data.max_prompt_tokens": 514}
    p = only({**tp8, "rollout.max_tokens": 512}, SP, "warning")
    assert_numbers(p, "sequence length 1026", "514 + max_tokens 512", "TP = 8",
                   "padded to 1032 tokens (6 of padding)")
    assert p.suggestion == "set rollout.max_tokens: 518"
    assert SP not in paths({**tp8, "rollout.max_tokens": 518})
    assert SP not in paths({**tp8, "rollout.max_tokens": 510})
    # Without sequence parallelism nothing is split, so nothing is padded.
    assert SP not in paths({**DENSE, **tp8, "rollout.max_tokens": 512,
                            "train.parallelism.sequence_parallel": False})


def test_sequence_parallel_with_context_parallel_splits_each_cp_share() -> None:
    # CP 2 holds S/2 positions per rank, SP splits those over TP 4: S % 8, though S % 2·CP = 0.
    cp2 = {"train.parallelism.context": 2, "train.parallelism.tensor": 4}
    p = only({**cp2, "rollout.max_tokens": 4100}, SP, "warning")
    assert_numbers(p, 5124, "CP·TP = 2·4 = 8", "padded to 5128")
    assert p.suggestion == "set rollout.max_tokens: 4104"
    assert SP not in paths({**cp2, "rollout.max_tokens": 4104})
    # The CP error's hint keeps SP's multiple: 4104, not 4100 (2·CP = 4 alone).
    assert only({**cp2, "rollout.max_tokens": 4098}, CP).suggestion == \
        "set rollout.max_tokens: 4104"


# --------------------------------------------------------------------------- context parallel


def test_context_parallel_needs_seq_len_multiple_of_2cp() -> None:
    p = only({"train.parallelism.context": 2, "rollout.max_tokens": 4095}, CP)
    assert_numbers(p, 5119, "2·CP = 4")
    assert p.suggestion == "set rollout.max_tokens: 4096"
    assert CP not in paths({"train.parallelism.context": 2})


# --------------------------------------------------------------------------- batch arithmetic


def test_global_batch_not_a_multiple_of_micro_times_dp() -> None:
    p = only({"train.global_batch_size": 60, "rollout.prompts_per_step": 30}, ("train", "global_batch_size"))
    assert_numbers(p, 60, "1·8 = 8")
    assert "global_batch_size: 48" in p.suggestion  # divides 240 rollouts


VPP2 = {"train.parallelism.pipeline": 2, "train.parallelism.virtual_pipeline": 2}  # DP 4


def test_virtual_pipeline_needs_pp_micro_batches() -> None:
    # verl issue 1004: PP 2, VPP 2 and one micro-batch per step.
    p = only({**VPP2, "train.micro_batch_size": 16}, VPP)
    assert_numbers(p, "PP = 2", "global_batch_size 64", "16·4) = 1")
    assert p.suggestion.startswith("set train.micro_batch_size: 8 (2 micro-batches), "
                                   "or train.global_batch_size: 128")
    # With micro-batches of 1 only a larger global batch helps (8 divides the 256 rollouts).
    p = only({**VPP2, "train.global_batch_size": 4}, VPP)
    assert_numbers(p, "1·4) = 1")
    assert p.suggestion.startswith("set train.global_batch_size: 8,")


def test_virtual_pipeline_with_pp_micro_batches_is_valid() -> None:
    spec = build({**VPP2, "train.micro_batch_size": 8})
    assert make_plan(spec).micro_batches_per_step == 2
    assert errors_of(spec) == []
    assert VPP not in paths({**VPP2, "train.global_batch_size": 8})


# --------------------------------------------------------------------------- rollout


def test_replica_does_not_tile_the_rollout_gpus() -> None:
    p = only({"rollout.parallelism.data": 3, "rollout.parallelism.expert_parallel": False}, R_PAR)
    assert_numbers(p, "4·3 = 12", "8 GPUs")


def test_replica_straddling_nodes_is_rejected() -> None:
    # 24 GPUs hold two 12-GPU replicas, but the second would span half of two nodes.
    p = only({"rollout.nodes": 3, "rollout.parallelism.data": 3,
              "rollout.parallelism.expert_parallel": False}, R_PAR)
    assert_numbers(p, 12, 24)


def test_replica_spanning_whole_nodes_is_valid() -> None:
    assert errors_of(build({"rollout.nodes": 4, "rollout.parallelism.tensor": 8,
                            "rollout.parallelism.data": 2})) == []


def test_rollout_heads_not_a_multiple_of_tp() -> None:
    p = [q for q in errors_of(build({"rollout.parallelism.tensor": 3, "rollout.parallelism.data": 1,
                                     "rollout.parallelism.expert_parallel": False}))
         if q.path == R_TP and "num_attention_heads" in q.message]
    assert len(p) == 1
    assert_numbers(p[0], 32, 3)


def test_fewer_kv_heads_than_tp_are_replicated() -> None:
    spec = build({"rollout.parallelism.tensor": 8, "rollout.parallelism.data": 1})
    assert errors_of(spec) == []


def test_kv_heads_that_cannot_be_split_over_tp() -> None:
    p = only({f"{ARCH}.num_attention_heads": 48, f"{ARCH}.num_query_groups": 6}, R_TP)
    assert_numbers(p, "6 KV heads", "size 4")


def test_rollout_expert_parallel_size_must_divide_experts() -> None:
    p = only({f"{MOE}.num_experts": 100, "train.parallelism.expert": 4}, R_EP)
    assert_numbers(p, "4·2 = 8", 100)
    assert p.suggestion.startswith("set rollout.redundant_experts: 4, or choose TP·DP")  # 104


REDUNDANT = ("rollout", "redundant_experts")
E100 = {f"{MOE}.num_experts": 100, "train.parallelism.expert": 4}  # rollout EP 8


def test_redundant_experts_count_in_the_rollout_expert_parallel_size() -> None:
    p = only({**E100, "rollout.redundant_experts": 3}, R_EP)
    assert_numbers(p, "4·2 = 8", "num_experts 100 + redundant_experts 3 = 103")
    assert "redundant_experts: 4" in p.suggestion and "1, 103" in p.suggestion
    assert errors_of(build({**E100, "rollout.redundant_experts": 4})) == []
    assert errors_of(build({**E100, "rollout.redundant_experts": 12})) == []
    # 128 experts already divide EP 8: 8 redundant keep them divisible, 4 do not.
    assert errors_of(build({"rollout.redundant_experts": 8})) == []
    assert R_EP in paths({"rollout.redundant_experts": 4})


def test_redundant_experts_need_rollout_expert_parallel() -> None:
    p = only({"rollout.redundant_experts": 8, "rollout.parallelism.expert_parallel": False},
             REDUNDANT)
    assert_numbers(p, "redundant_experts 8", "expert_parallel is false")
    assert "expert_parallel: true" in p.suggestion


def test_redundant_experts_need_an_expert_parallel_size_above_1() -> None:
    p = only({"rollout.redundant_experts": 8, "rollout.parallelism.tensor": 1,
              "rollout.parallelism.data": 1}, REDUNDANT)
    assert_numbers(p, "1·1 = 1", "TP·DP > 1")


def test_redundant_experts_need_the_vllm_engine() -> None:
    p = only({**CPU_LOCAL, "rollout.engine": "local", "rollout.redundant_experts": 8}, REDUNDANT)
    assert_numbers(p, "redundant_experts 8", "rollout.engine is local")
    assert p.suggestion.startswith("set rollout.engine: vllm")
    assert errors_of(build({**CPU_LOCAL, "rollout.redundant_experts": 8})) == []


def test_redundant_experts_on_a_dense_model() -> None:
    p = only({**DENSE, "rollout.redundant_experts": 8}, REDUNDANT)
    assert "dense" in p.message


def test_rollout_expert_parallel_on_a_dense_model_is_a_warning() -> None:
    p = only({**DENSE, "rollout.parallelism.expert_parallel": True}, R_EP, "warning")
    assert "dense" in p.message


# --------------------------------------------------------------------------- router replay


# r2 / r3 on a dense model: refused by runtime.capabilities (dense_replay), tests/compiler/
# test_preflight.py::test_router_replay_needs_an_moe_model.


@pytest.mark.parametrize("engine", ["vllm", "local"])
def test_r3_with_any_engine_and_expert_parallel_rollout_is_valid(engine: str) -> None:
    edits = {"router_replay.mode": "r3", "rollout.engine": engine}
    if engine == "local":
        edits.update(CPU_LOCAL)
    assert errors_of(build(edits)) == []


# --------------------------------------------------------------------------- FP8 rollouts


FP8 = {"rollout.fp8": True, "router_replay.mode": "r3"}
CORRECTION = ("algorithm", "correction", "mode")


def test_fp8_rollouts_without_a_train_inference_correction_are_an_error() -> None:
    p = only({**FP8, "algorithm.correction.mode": "none"}, CORRECTION)
    assert "rollout.fp8" in p.message and "2601.18150" in p.message
    assert p.suggestion.startswith("set algorithm.correction.mode: tis")
    assert ("rollout", "fp8") in p.related
    # The same correction without FP8, and FP8 with tis or mis, raise nothing here.
    assert CORRECTION not in paths({"algorithm.correction.mode": "none"})
    for mode in ("tis", "mis"):
        assert problems_of(build({**FP8, "algorithm.correction.mode": mode})) == []


@pytest.mark.parametrize("mode", ["off", "r2"])
def test_fp8_rollouts_on_an_moe_model_without_r3_are_a_warning(mode: str) -> None:
    p = only({"rollout.fp8": True, "router_replay.mode": mode}, ("router_replay", "mode"),
             "warning")
    assert "MoE" in p.message and "2601.18150" in p.message
    assert (f"mode is {mode}" if mode == "off" else "trainer's own routing") in p.message
    assert p.suggestion == "set router_replay.mode: r3"
    assert ("router_replay", "mode") not in paths({"router_replay.mode": mode})
    # A dense model has no routing to replay.
    assert ("router_replay", "mode") not in paths({**DENSE, "rollout.fp8": True})


def test_fp8_rollouts_with_a_sync_tolerance_below_the_fp8_gap_are_a_warning() -> None:
    tol = ("system", "weight_sync_tolerance")
    p = only({**FP8, "system.weight_sync_tolerance": 1e-4}, tol, "warning")
    assert "0.0001" in p.message and "set system.weight_sync_tolerance: 0.01" in p.suggestion
    assert tol not in paths({"system.weight_sync_tolerance": 1e-4})
    assert tol not in paths({**FP8, "system.weight_sync_tolerance": 0.01})


def test_stale_rollouts_without_a_train_inference_correction_are_an_error() -> None:
    p = only({"system.max_staleness": 2, "algorithm.correction.mode": "none"}, CORRECTION)
    assert "max_staleness 2" in p.message and "π_old / μ" in p.message
    assert p.suggestion.startswith("set algorithm.correction.mode: tis")
    assert ("system", "max_staleness") in p.related
    for mode in ("tis", "mis"):
        assert problems_of(build({"system.max_staleness": 2,
                                  "algorithm.correction.mode": mode})) == []


COLOCATED = {"rollout.placement": "colocated", "rollout.nodes": 2}  # the base trains on 2
UTIL = ("rollout", "gpu_memory_utilization")


def test_colocated_engines_run_on_the_trainers_nodes() -> None:
    p = only({"rollout.placement": "colocated"}, ("rollout", "nodes"))
    assert_numbers(p, "trainer's 2 node(s)", "rollout.nodes is 1")
    assert p.suggestion == "set rollout.nodes: 2, or rollout.placement: disaggregated"
    spec = build(COLOCATED | {"rollout.gpu_memory_utilization": 0.28})
    assert problems_of(spec) == []
    assert make_plan(spec).rl_nodes == 2  # the trainer's nodes, shared
    assert make_plan(build()).rl_nodes == 3  # disaggregated: 2 trainer + 1 rollout


def test_colocated_trainer_state_and_vllm_share_must_fit_one_gpu() -> None:
    # 8.8 GB weights + 17.6 GB grads + 22.9 GB optimizer = 49.3 GB stay through generation.
    p = only(COLOCATED, UTIL)
    assert_numbers(p, "49.3 GB", "0.85 × 80 GB = 68.0 GB", "117.3 GB > 80 GB")
    assert p.suggestion == "set rollout.gpu_memory_utilization: 0.28 or less"  # ≤ 90 % of 80
    p = only(COLOCATED | {"rollout.gpu_memory_utilization": 0.3}, UTIL, "warning")
    assert_numbers(p, "73.3 GB", "within 10 %")
    # No utilization leaves vLLM its 8.1 GB of weights + one sequence next to the trainer.
    p = only(COLOCATED | {"cluster.gpu_memory_gb": 60}, UTIL)
    assert p.suggestion.startswith("shrink the trainer's memory")
    assert "placement: disaggregated" in p.suggestion
    # Disaggregated, the engines have their GPUs to themselves; on CPU nothing is estimated.
    assert UTIL not in paths({"rollout.gpu_memory_utilization": 0.85})
    assert UTIL not in paths(COLOCATED | CPU_LOCAL)


# --------------------------------------------------------------------------- run-level


def test_rollouts_per_step_not_a_multiple_of_global_batch() -> None:
    p = only({"rollout.prompts_per_step": 30}, ("rollout", "prompts_per_step"))
    assert_numbers(p, "30 × 8 = 240", 64)
    assert "prompts_per_step: 24 or 32" in p.suggestion


def test_prompt_plus_response_exceeds_positions() -> None:
    p = only({"rollout.max_tokens": 40000}, ("rollout", "max_tokens"))
    assert_numbers(p, 1024, 40000, 41024, 40960)
    assert p.suggestion == "set rollout.max_tokens: 39936 or less"


def test_eval_tokens_exceed_positions() -> None:
    p = only({"eval.max_tokens": 40000}, ("eval", "max_tokens"))
    assert_numbers(p, 41024, 40960)


def test_slurm_without_partition_is_a_warning() -> None:
    only({"cluster.partition": DELETE}, ("cluster", "partition"), "warning")


@pytest.mark.parametrize("field, value, flag", [
    ("cpus_per_task", 4, "--cpus-per-task"), ("exclusive", False, "--exclusive"),
    ("mem_gb", 256, "--mem")])
def test_slurm_resources_set_on_a_local_spec_are_warned(field: str, value: object, flag: str) -> None:
    local = {"cluster.scheduler": "local", "cluster.partition": DELETE, "system.weight_sync": "nccl"}
    assert ("cluster", field) not in paths(local)  # the defaults are not the user's
    p = only({**local, f"cluster.{field}": value}, ("cluster", field), "warning")
    assert flag in p.message and "local run" in p.message
    assert "cluster.scheduler: slurm" in (p.suggestion or "")
    assert ("cluster", field) not in paths({f"cluster.{field}": value})  # on Slurm: no warning


def test_reward_workers_beyond_the_drivers_cpus_are_warned() -> None:
    """The base spec's RL task has cpus_per_task × gpus_per_node CPUs on the batch host."""
    cluster = build().cluster
    cpus = cluster.cpus_per_task * cluster.gpus_per_node
    assert ("system", "reward_workers") not in paths({"system.reward_workers": cpus - 1})
    p = only({"system.reward_workers": cpus}, ("system", "reward_workers"), "warning")
    assert_numbers(p, f"need {cpus + 1} CPUs", f"has {cpus}")
    assert f"set system.reward_workers: {cpus - 1} or fewer" in (p.suggestion or "")
    local = {"cluster.scheduler": "local", "cluster.partition": DELETE, "system.weight_sync": "nccl"}
    assert ("system", "reward_workers") not in paths({**local, "system.reward_workers": cpus})


def test_ipc_weight_sync_across_slurm_nodes() -> None:
    p = only({"system.weight_sync": "ipc"}, ("system", "weight_sync"))
    assert_numbers(p, "2 node(s)", "1 node(s)")
    # Colocated engines share the trainer's nodes (ipc is refused by the runtime instead).
    assert ("system", "weight_sync") not in paths(COLOCATED | {"system.weight_sync": "ipc"})


# --------------------------------------------------------------------------- ZVE budgets


def test_drop_without_fallback_cannot_fill_a_batch() -> None:
    stage = {"type": "flat_groups", "action": "drop", "oversample": 1.5, "max_refills": 1}
    p = only({"filters": [stage]}, ("filters", 0, "fallback"))
    assert_numbers(p, "2 round(s)", "oversample 1.5", "32 prompts", "768 rollouts", "512 beyond the 256")
    budget = make_plan(build({"filters": [stage]})).stage_budgets[0]
    assert not budget.can_fill_batch_worst_case
    assert ("filters", 0, "fallback") not in paths({"filters": [{**stage, "fallback": "keep"}]})


def test_drop_settings_on_another_action_are_a_warning() -> None:
    stage = {"type": "flat_groups", "action": "keep", "oversample": 2.0}
    p = only({"filters": [stage]}, ("filters", 0, "oversample"), "warning")
    assert "keep" in p.message


def test_reward_shaping_that_does_nothing_is_a_warning() -> None:
    p = only({"filters": [{"type": "reward_shaping"}]}, ("filters", 0), "warning")
    assert "0" in p.message


def test_adaptive_group_size_that_cannot_grow_is_a_warning() -> None:
    p = only({"filters": [{"type": "adaptive_group_size", "max_n": 8}]}, ("filters", 0, "max_n"),
             "warning")
    assert_numbers(p, "max_n 8", "rollout.n 8")


# --------------------------------------------------------------------------- references

EST = ("algorithm", "advantage", "estimator")


def test_rl_zvp_estimator_without_a_rl_zvp_stage() -> None:
    p = only({"algorithm.advantage.estimator": "rl_zvp"}, EST)
    assert "flat_groups" in p.suggestion


def test_rl_zvp_stage_without_the_rl_zvp_estimator() -> None:
    p = only({"filters": [{"type": "flat_groups", "action": "rl_zvp"}]}, EST)
    assert "filters[0].action" in p.message
    assert p.suggestion == "set algorithm.advantage.estimator: rl_zvp"


def test_rl_zvp_fallback_pairs_with_the_rl_zvp_estimator() -> None:
    stage = {"type": "flat_groups", "action": "drop", "fallback": "rl_zvp"}
    assert EST in paths({"filters": [stage]})
    assert errors_of(build({"filters": [stage], "algorithm.advantage.estimator": "rl_zvp"})) == []


def test_judge_key_must_be_passed_through() -> None:
    judge = {"type": "http", "url": "http://judge", "model": "j", "api_key_env": "JUDGE_KEY"}
    p = only({"reward.judge": judge, "cluster.env_passthrough": ["HF_TOKEN"]},
             ("reward", "judge", "api_key_env"))
    assert_numbers(p, "JUDGE_KEY", "HF_TOKEN")
    assert not errors_of(build({"reward.judge": judge, "cluster.env_passthrough": ["JUDGE_KEY"]}))


def test_judge_key_of_a_rule_judge_is_not_read() -> None:
    # A rule judge reads no key: no passthrough error, the field's warning instead.
    judge = {"type": "rule", "api_key_env": "JUDGE_KEY"}
    p = only({"reward.judge": judge}, ("reward", "judge", "api_key_env"), "warning")
    assert "no effect for a rule judge" in p.message


@pytest.mark.parametrize("field", ["url", "model", "api_key_env", "timeout_s"])
def test_http_judge_fields_on_a_rule_judge_are_a_warning(field: str) -> None:
    value = {"url": "http://judge", "model": "j", "api_key_env": "HF_TOKEN", "timeout_s": 30.0}
    p = only({"reward.judge": {"type": "rule", field: value[field]}}, ("reward", "judge", field),
             "warning")
    assert_numbers(p, f"reward.judge.{field}", "judge type is rule", "no effect")
    assert p.suggestion == f"remove reward.judge.{field}, or set reward.judge.type: http"
    assert p.related == (("reward", "judge", "type"),)
    assert ("reward", "judge", field) not in paths(
        {"reward.judge": {"type": "http", **value}, "cluster.env_passthrough": ["HF_TOKEN"]})


def test_tie_margin_on_an_http_judge_is_a_warning() -> None:
    http = {"type": "http", "url": "http://judge", "model": "j"}
    p = only({"reward.judge": {**http, "tie_margin": 0.1}}, ("reward", "judge", "tie_margin"),
             "warning")
    assert_numbers(p, "judge type is http", "no effect for an http judge")
    assert p.suggestion == "remove reward.judge.tie_margin, or set reward.judge.type: rule"
    assert problems_of(build({"reward.judge": http})) == []
    assert problems_of(build({"reward.judge": {"type": "rule", "tie_margin": 0.1}})) == []


def test_parameters_of_an_unselected_loss_are_a_warning() -> None:
    p = only({"algorithm.loss": "espo", "algorithm.gspo": {"clip_low": 1.0e-4}},
             ("algorithm", "gspo"), "warning")
    assert "espo" in p.message
    assert ("algorithm", "espo") not in paths({"algorithm.espo": {"alpha": 0.03}})


def test_megatron_checkpoint_with_the_local_trainer() -> None:
    p = only({**CPU_LOCAL, "train.backend": "local", "model.checkpoint_format": "megatron"},
             ("model", "checkpoint_format"))
    assert "local trainer" in p.message


def test_megatron_checkpoint_without_a_tokenizer() -> None:
    p = only({"model.checkpoint_format": "megatron", "model.tokenizer": None},
             ("model", "tokenizer"))
    assert "to_hf" in p.message and "model.tokenizer" in p.suggestion
    assert ("model", "tokenizer") not in paths(
        {"model.checkpoint_format": "megatron", "model.tokenizer": "/models/tok"})
    assert ("model", "tokenizer") not in paths({"model.tokenizer": None})  # HF has its own


def test_eval_without_held_out_data_is_an_error() -> None:
    p = only({"data.eval": DELETE}, ("eval", "enabled"))
    assert "data.eval" in p.message and "data.eval" in p.suggestion
    p = only({"data.eval": DELETE, "eval.enabled": False, "eval.every_steps": 5},
             ("eval", "every_steps"))
    assert "no held-out prompts" in p.message
    off = {"data.eval": DELETE, "eval.enabled": False, "eval.every_steps": 0}
    assert not {("eval", "enabled"), ("eval", "every_steps")} & paths(off)


# --------------------------------------------------------------------------- memory


def test_trainer_over_memory_without_optimizer_state_is_an_error() -> None:
    p = only({"cluster.gpu_memory_gb": 24.0}, MEM)
    assert_numbers(p, "> 24 GB", "weights 8.8", "grads 17.6")


def test_trainer_over_memory_only_with_optimizer_state_is_a_warning() -> None:
    # Weights + grads + activations ≈ 28.6 GB, with the optimizer state ≈ 51.5 GB (the
    # Megatron trainer's SDPA core attention keeps no score matrix: no attention part).
    p = only({"cluster.gpu_memory_gb": 40.0}, MEM, "warning")
    assert_numbers(p, "51.5 GB", "> 40 GB", "optimizer state on the GPU (22.9 GB now)")
    assert "attention" not in p.message
    assert p.suggestion.startswith("set train.optimizer.cpu_offload: true")


def test_trainer_memory_within_10_percent_is_a_warning() -> None:
    p = only({"cluster.gpu_memory_gb": 55.0}, MEM, "warning")
    assert_numbers(p, "51.5 GB", "55 GB", "10 %")


def test_rollout_over_memory() -> None:
    # One GPU per replica holds all 30.5 B parameters: 61 GB > 80 × 0.5.
    p = only({"rollout.parallelism.tensor": 1, "rollout.parallelism.data": 1,
              "rollout.gpu_memory_utilization": 0.5}, R_PAR)
    assert_numbers(p, "61.6 GB", "40.0 GB")


def test_rollout_memory_within_10_percent() -> None:
    p = only({"rollout.parallelism.tensor": 1, "rollout.parallelism.data": 1,
              "rollout.gpu_memory_utilization": 0.8}, R_PAR, "warning")
    assert_numbers(p, "61.6 GB", "64.0 GB")


def test_cpu_runs_skip_the_memory_comparison() -> None:
    # 1 GB would be far over on GPUs: the one problem is that the value is not read.
    p = only({**CPU_LOCAL, "cluster.gpu_memory_gb": 1.0}, MEM, "warning")
    assert p.message == ("cluster.gpu_memory_gb is 1.0 but has no effect with cluster.devices: "
                         "cpu (memory per GPU is compared for GPU runs only)")
    spec = build({**CPU_LOCAL, "cluster.gpu_memory_gb": 1.0})
    assert make_plan(spec).train_memory.notes == ("cpu run: not estimated",)


# --------------------------------------------------------------------------- unused settings


def _unused(edits: dict[str, Any]) -> dict[tuple, Problem]:
    """The warnings of unused_settings, by path (one per path)."""
    spec = build(edits)
    found = {p.path: p for p in unused_settings(spec, make_plan(spec))}
    assert all(p.severity == "warning" and p.suggestion and p.related for p in found.values())
    return found


def test_the_megatron_layout_on_the_embedded_trainer_is_a_warning() -> None:
    # BASE: TP 2 with sequence parallelism, EP 8, ETP 1; Megatron reads them all.
    assert _unused({}) == {}
    found = _unused({"train.backend": "local", "train.optimizer.distributed": False,
                     f"{MOE}.token_dispatcher": "allgather"})
    assert set(found) == {TP, SP, EP, ETP, ("train", "optimizer", "distributed"),
                          ("model", "architecture", "moe", "token_dispatcher")}
    assert found[TP].message == ("train.parallelism.tensor is 2 but has no effect with "
                                 "train.backend: local; the embedded trainer is one process: it "
                                 "has no model parallelism")
    assert found[SP].suggestion == "remove train.parallelism.sequence_parallel, or set " \
                                   "train.backend: megatron"
    assert "keeps the whole optimizer state" in found[("train", "optimizer", "distributed")].message
    # Written at their defaults, the same keys say nothing.
    layout = {f"train.parallelism.{k}": v for k, v in
              (("tensor", 1), ("sequence_parallel", False), ("expert", 1),
               ("expert_tensor", DELETE))}
    assert _unused({**layout, "train.backend": "local", "train.optimizer.distributed": True}) == {}
    only({"train.backend": "local", "train.parallelism.pipeline": 2}, PP, "warning")


def test_vllm_settings_on_the_embedded_engine_are_a_warning() -> None:
    local = {**CPU_LOCAL, "cluster.partition": DELETE, "rollout.engine": "local"}
    found = _unused({**local, "rollout.max_num_seqs": 16, "rollout.gpu_memory_utilization": 0.5})
    assert set(found) == {("rollout", "max_num_seqs"), ("rollout", "gpu_memory_utilization"),
                          R_TP, ("rollout", "parallelism", "data"), R_EP}
    assert "rollout.max_num_seqs is 16 but has no effect with rollout.engine: local" in \
        found[("rollout", "max_num_seqs")].message
    # TP 4 × DP 2 = 8 devices per replica: one embedded replica on the node instead of 8.
    assert found[R_TP].message.endswith("it only makes each replica claim 8 device(s), so the "
                                        "rollout nodes run 1 replica(s) instead of 8")
    assert _unused({**local, "rollout.parallelism": {}}) == {}
    assert R_TP not in _unused({**local, "rollout.engine": "vllm"})


def test_slurm_settings_on_the_local_scheduler_are_a_warning() -> None:
    assert _unused({"cluster.account": "a", "cluster.qos": "q", "cluster.cpus_per_task": 4,
                    "cluster.max_requeues": 0}) == {}
    found = _unused({"cluster.scheduler": "local", "cluster.account": "a", "cluster.qos": "q",
                     "cluster.cpus_per_task": 4, "cluster.max_requeues": 0})
    # cpus_per_task is warned once, by cluster_settings (test_slurm_resources_set_on_a_local_...)
    assert set(found) == {("cluster", f)
                          for f in ("partition", "account", "qos", "max_requeues")}
    assert "only a Slurm job requeues itself" in found[("cluster", "max_requeues")].message
    assert found[("cluster", "qos")].message == ("cluster.qos is q but has no effect with "
                                                 "cluster.scheduler: local (only a Slurm request "
                                                 "carries it)")
    assert _unused({"cluster.scheduler": "local", "cluster.partition": DELETE,
                    "cluster.cpus_per_task": 8}) == {}


def test_memory_hint_names_the_offload_keys() -> None:
    """An estimate over capacity only with the optimizer state names
    train.optimizer.cpu_offload; with a partial offload, offload_fraction; an offload_fraction
    without cpu_offload is a setting without effect."""
    # expert-DP 1: the Adam state of the experts is not sharded, 71.9 GB per GPU in all (SDPA
    # core attention: no score matrices), over a 64 GB GPU only with the optimizer state
    one_node = ["train.nodes=1", "cluster.gpu_memory_gb=64"]
    src = load_spec(EXAMPLES / "qwen3-30b-a3b.yaml", one_node)
    warned = [p for p in check(src.spec, make_plan(src.spec)) if p.path == ("cluster", "gpu_memory_gb")]
    assert [p.severity for p in warned] == ["warning"]
    assert warned[0].suggestion.startswith("set train.optimizer.cpu_offload: true")
    assert "71.9 GB" in warned[0].message and "attention" not in warned[0].message
    src = load_spec(EXAMPLES / "qwen3-30b-a3b.yaml", [*one_node, "train.optimizer.cpu_offload=true",
                                                    "train.optimizer.offload_fraction=0.01"])
    warned = [p for p in check(src.spec, make_plan(src.spec)) if p.path == ("cluster", "gpu_memory_gb")]
    assert warned[0].suggestion.startswith("raise train.optimizer.offload_fraction (now 0.01)")
    src = load_spec(EXAMPLES / "qwen3-30b-a3b.yaml", ["train.optimizer.offload_fraction=0.5"])
    unused = [p for p in check(src.spec, make_plan(src.spec))
              if p.path == ("train", "optimizer", "offload_fraction")]
    assert [p.severity for p in unused] == ["warning"] and "no effect" in unused[0].message


def test_a_run_of_one_response_groups_cannot_learn_from_group_advantages() -> None:
    """n = 1: zero variance everywhere (an error), or where adaptive_group_size keeps the
    base size (a warning); RL-ZVP's token advantages are another matter."""
    one = {"rollout.n": 1, "rollout.prompts_per_step": 256}
    [problem] = [p for p in problems_of(build(one)) if p.path == ("rollout", "n")]
    assert problem.severity == "error" and "RL learns nothing" in problem.message
    adaptive = build({**one, "filters": [{"type": "adaptive_group_size"}]})
    [problem] = [p for p in problems_of(adaptive) if p.path == ("rollout", "n")]
    assert problem.severity == "warning" and "adaptive_group_size" in problem.message
    assert not [p for p in problems_of(build({"rollout.n": 2})) if p.path == ("rollout", "n")]


def test_a_warmup_as_long_as_the_run_is_said() -> None:
    """BASE: 32 prompts × 8 = 256 rollouts / 64 = 4 optimizer steps per RL step, × 100 steps."""
    def warned(warmup: int) -> list[Problem]:
        return [p for p in problems_of(build({"train.optimizer.warmup_steps": warmup}))
                if p.path == ("train", "optimizer", "warmup_steps")]

    assert warned(399) == []
    [problem] = warned(400)
    assert problem.severity == "warning"
    assert problem.message.startswith("warmup_steps 400 ≥ the run's 400 optimizer steps")
