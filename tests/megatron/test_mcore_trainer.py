"""The Megatron trainer (``runtime.megatron.engine.MegatronTrainer``) against the embedded one.

Same HF weights, same batch, same spec sections: one RL step of two PPO epochs × two optimizer
steps (Adam with weight decay, warm-up then cosine, gradient clipping, TIS correction). The
Megatron side runs megatron-core's DDP, distributed optimizer and ``forward_backward_func``;
its weights, exported to HF, must equal the embedded trainer's:

    max |Δθ| ≤ 2e-5 while the step moves weights by ≈ 3.5e-3 (fp32; measured ≤ 1.1e-5,
    summation order only), and the loss and ratio metrics agree to 1e-4 relative.

A Megatron checkpoint resumes the step exactly.

EP = 2 runs two processes (gloo, file:// rendezvous): data parallelism 2, four of the eight
experts per rank, the optimizer state sharded over both. TP = 2 × EP = 2 runs the same two
processes as one tensor-parallel pair with sequence parallelism, PP = 2 as two pipeline
stages, CP = 2 as two context-parallel ranks. R2 / R3 go through megatron-core's
``RouterReplay``; the R3 trace is another policy's routing, so the control (the same step
routing freely) lands far away, and agreeing with the embedded replay is not an accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.megatron._worker import launch

pytestmark = pytest.mark.megatron

ATOL = 2e-5


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _check(out: dict[str, Any]) -> None:
    assert _max_diff(out["initial"], out["hf"]) == 0.0  # the start is the same weights
    moved = _max_diff(out["ref"], out["hf"])
    assert moved > 50 * ATOL, f"the step hardly moved the weights ({moved:.3g})"
    got, ref = out["got"], out["ref"]
    # A key bias (GLM-4.5's q/k/v biases) adds q·b to every key's score of a query: constant
    # over the keys in the dimensions RoPE leaves unrotated (partial_rotary_factor 0.5), so
    # the softmax ignores it and its gradient there is zero up to rounding. Adam's first step
    # turns rounding-level gradients into steps of up to lr: those elements are compared only
    # by the bound below, not counted.
    invariant = [k for k in ref if k.endswith("self_attn.k_proj.bias")]
    diffs = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref if k not in invariant])
    for k in invariant:
        assert (got[k] - ref[k]).abs().max() <= moved, k
    # Adam's first updates are nearly sign(g)·lr: an element whose gradient is at rounding
    # level (a few of ~250 k here) may step differently on the two trainers, by up to the
    # step itself. Every other element agrees within ATOL.
    off = int((diffs > ATOL).sum())
    assert off <= diffs.numel() // 10_000, (
        f"{off} elements differ by more than {ATOL} (max |Δθ| = {diffs.max():.3g}; the step "
        f"moved weights by {moved:.3g})")
    assert diffs.max() <= moved
    if out["free"] is not None:
        assert _max_diff(out["free"], out["ref"]) > 10 * ATOL, "replay made no difference"
    ref, got = out["ref_metrics"], out["metrics"]
    for key in ("loss", "ratio/mean", "entropy", "train_inference_gap", "optimizer_steps",
                "correction/mean_weight", *(("kl",) if "kl" in ref else ())):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)


def test_world_size_1_step_matches_embedded(tmp_path: Path) -> None:
    (out,) = launch("tests.megatron._train_worker", 1, ["1", "1", str(tmp_path), "off", "espo"],
                    tmp_path)
    _check(out)


@pytest.mark.parametrize("layout", [["off", "espo"], ["r2", "espo", "2"]], ids=["world-1", "pp-2"])
def test_tied_embeddings_step_matches_embedded_and_publishes_tied(tmp_path: Path,
                                                                  layout: list[str]) -> None:
    """``tie_embeddings: true`` on the Megatron trainer: the GPTModel shares its embedding
    with the output layer (an untied output layer would keep other weights and the step
    would differ), the step equals the embedded trainer's on the tied HF policy, and the
    export, one tensor, publishes as a tied HF model (``policy_from_state_dict``). Over two
    pipeline stages the last holds a copy of the embedding, filled from the first at load,
    whose gradient megatron-core sums with the first's: both copies take the same step."""
    from runtime.policy import policy_from_state_dict
    from tests.megatron._worker import tiny_hf_policy

    outs = launch("tests.megatron._train_worker", len(layout) - 1,
                  ["1", "1", str(tmp_path), *layout, "tie=1"], tmp_path)
    for out in outs:
        assert "lm_head.weight" not in out["got"]  # Megatron holds one tensor for both
        for key in ("hf", "ref", "free"):  # HF's state dict names the shared tensor twice
            weights = out[key] or {}  # (free: the step without replay, if replayed)
            for name in (weights and ["lm_head.weight"]):
                assert torch.equal(weights.pop(name), weights["model.embed_tokens.weight"])
        _check(out)
        copy = out["tied_copy"]
        assert (copy is None) == (len(outs) == 1)
        assert copy is None or torch.equal(copy, out["got"]["model.embed_tokens.weight"])
        published = policy_from_state_dict(tiny_hf_policy(tie=True).config, out["got"])
        assert published.lm_head.weight is published.model.embed_tokens.weight
        assert torch.equal(published.lm_head.weight, out["got"]["model.embed_tokens.weight"])


@pytest.mark.parametrize(("replay", "loss"), [("off", "cispo"), ("r3", "grpo"), ("r2", "espo"),
                                             ("r3", "grpo-kl")])
def test_expert_parallel_2_step_matches_embedded(tmp_path: Path, replay: str, loss: str) -> None:
    outs = launch("tests.megatron._train_worker", 2, ["1", "2", str(tmp_path), replay, loss],
                  tmp_path)
    for out in outs:
        _check(out)
    # data-parallel ranks end with the same weights
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


@pytest.mark.parametrize(("replay", "loss"), [("r3", "grpo"), ("r2", "espo")])
def test_tensor_and_expert_parallel_2_step_matches_embedded(tmp_path: Path, replay: str,
                                                           loss: str) -> None:
    """TP = 2 with sequence parallelism and EP = 2 on two ranks: each rank holds half of every
    dense weight, half of the experts and half of each sequence (R3 targets are sliced by
    sequence, R2 records gathered); clipping needs the gradient norm over all shards."""
    outs = launch("tests.megatron._train_worker", 2, ["2", "2", str(tmp_path), replay, loss],
                  tmp_path)
    for out in outs:
        _check(out)
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


@pytest.mark.parametrize(("replay", "loss"), [("r3", "grpo"), ("off", "cispo")])
def test_expert_tensor_parallel_2_step_matches_embedded(tmp_path: Path, replay: str,
                                                        loss: str) -> None:
    """ETP = 2 (TP 1, EP 1): each rank holds half of every expert ([gate_r; up_r] rows of
    fc1, columns of fc2) and the data of its own data-parallel rank; the allgather dispatcher
    gathers both ranks' tokens over the expert-tensor group, and the experts' gradients are
    reduced over the expert data-parallel group (size 1 here), not the dense one (size 2),
    which would average the two different halves (megatron-core 0.16.1 marks experts for that
    only at EP > 1: ``runtime.megatron.model._mark_tensor_parallel``)."""
    outs = launch("tests.megatron._train_worker", 2,
                  ["1", "1", str(tmp_path), replay, loss, "etp=2"], tmp_path)
    for out in outs:
        _check(out)
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


@pytest.mark.parametrize(("etp", "replay", "loss"), [("tp", "r2", "espo"), ("1", "r3", "grpo")],
                         ids=["etp-unset", "etp-1"])
def test_tensor_parallel_2_without_expert_parallel_matches_embedded(tmp_path: Path, etp: str,
                                                                    replay: str,
                                                                    loss: str) -> None:
    """TP = 2 with EP = 1 (sequence parallelism): with ETP unset (= TP, Megatron-LM's default)
    every expert is TP-sharded and routes both ranks' sequence halves; with ETP 1 each rank
    runs its own sequence half through whole experts, whose gradients are then summed over
    the expert data-parallel group (both TP ranks), not averaged over the dense one (size 1)."""
    outs = launch("tests.megatron._train_worker", 2,
                  ["2", "1", str(tmp_path), replay, loss, f"etp={etp}"], tmp_path)
    for out in outs:
        _check(out)
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


VPP_UNEVEN = (2, ["1", "1", "2", "vpp=2", "layers=6", "last=4"])


@pytest.mark.parametrize(("family", "replay", "world", "layout"), [
    *[(family, "r3", *layout) for family in ("deepseek_v3", "glm4_moe") for layout in (
        (1, ["1", "1"]), (2, ["1", "1", "etp=2"]), (2, ["2", "1", "etp=tp"]), VPP_UNEVEN)],
    ("qwen3", "off", *VPP_UNEVEN), ("llama", "off", *VPP_UNEVEN),
], ids=[f"{f}-{x}" for f in ("deepseek_v3", "glm4_moe")
        for x in ("world-1", "etp-2", "tp-2-ep-1", "vpp-2-uneven")]
    + ["qwen3-vpp-2-uneven", "llama-vpp-2-uneven"])
def test_each_family_steps_as_embedded_at_the_recipe_layouts(
        tmp_path: Path, family: str, replay: str, world: int, layout: list[str]) -> None:
    """DeepSeek-V3 (MLA, q_lora) and GLM-4.5 (GQA with biases, partial RoPE): sigmoid router
    with the selection bias, a shared expert and a leading dense layer, R3 and GRPO, at world
    1 and the layouts of the published recipes: ETP 2, TP 2 with EP 1 (ETP = TP, sequence
    parallelism), PP 2 with two virtual stages each and uneven stages (2 + 4 layers); the
    dense families (no routing to replay) at the pipeline layout. The step equals the
    embedded HF trainer's on the same weights, and the ranks end equal."""
    tp, ep, *rest = layout
    outs = launch("tests.megatron._train_worker", world,
                  [tp, ep, str(tmp_path), replay, "grpo", *rest, f"family={family}"], tmp_path)
    for out in outs:
        _check(out)
    if world > 1:
        assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


def test_tensor_and_pipeline_parallel_2_with_sequence_parallelism_match_embedded(
        tmp_path: Path) -> None:
    """TP 2 × PP 2 on 4 ranks, the 245B example's kind of layout: sequence parallelism splits
    the hidden states that pass between the stages, and with them each MoE router's padding
    mask (``runtime.megatron.logprobs``); DeepSeek-V3's sigmoid router with its selection
    bias, R3 and ESPO. The step equals the embedded trainer's, and the ranks end equal."""
    outs = launch("tests.megatron._train_worker", 4,
                  ["2", "1", str(tmp_path), "r3", "espo", "2", "family=deepseek_v3", "layers=4"],
                  tmp_path)
    for out in outs:
        _check(out)
    assert all(_max_diff(outs[0]["got"], out["got"]) == 0.0 for out in outs)


@pytest.mark.parametrize(("replay", "loss"), [("r2", "espo"), ("r3", "grpo-kl")])
def test_pipeline_parallel_2_step_matches_embedded(tmp_path: Path, replay: str, loss: str) -> None:
    """PP = 2: one layer per stage, activations passed between the two ranks by megatron-core's
    1F1B schedule (the old-policy and reference passes forward-only); each stage replays or
    records its own MoE layer's experts, the loss and its metrics live on the last stage."""
    outs = launch("tests.megatron._train_worker", 2,
                  ["1", "1", str(tmp_path), replay, loss, "2"], tmp_path)
    for out in outs:
        _check(out)
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


@pytest.mark.parametrize(("replay", "loss", "layout"), [
    ("r3", "grpo", ["vpp=2", "layers=4"]),
    ("r3", "grpo-kl", ["vpp=2", "layers=6", "last=4"]),
    ("r2", "grpo", ["layers=4", "first=1", "last=3"]),
], ids=["vpp-2", "vpp-2-uneven", "uneven"])
def test_virtual_and_uneven_pipeline_stages_match_embedded(tmp_path: Path, replay: str, loss: str,
                                                           layout: list[str]) -> None:
    """PP = 2 with virtual pipeline stages (two model chunks per rank, megatron-core's
    interleaved 1F1B schedule; layers 0, 2 on rank 0 and 1, 3 on rank 1) and uneven stages
    (``num_layers_in_first/last_pipeline_stage``: 2 + 4 layers as 1 + 2 per chunk; 1 + 3
    without chunks). Each forward step runs one chunk, which replays (R3) or records (R2) its
    own routers only. The interleaved schedule with PP = 2 needs unbatched p2p (see
    ``MegatronTrainer``). R3 with a 3-layer model is not used: it is off by 1.6e-4 at world 1
    too (Adam on near-zero expert gradients), which has nothing to do with the layout."""
    outs = launch("tests.megatron._train_worker", 2,
                  ["1", "1", str(tmp_path), replay, loss, "2", *layout], tmp_path)
    for out in outs:
        _check(out)
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


@pytest.mark.parametrize(("tp", "ep", "replay", "loss", "family"), [
    ("1", "1", "r3", "grpo", "qwen3_moe"), ("1", "1", "r2", "espo", "qwen3_moe"),
    ("1", "1", "off", "grpo-kl", "qwen3_moe"), ("1", "1", "r3", "grpo", "deepseek_v3"),
    ("2", "1", "r3", "grpo", "qwen3_moe"), ("2", "2", "r2", "espo", "qwen3_moe"),
    ("1", "1", "r2", "espo", "deepseek_v3"), ("1", "1", "r3", "grpo", "glm4_moe"),
    ("1", "1", "off", "grpo", "qwen3"), ("1", "1", "off", "espo", "llama"),
], ids=["r3", "r2", "kl", "mla-r3", "tp2-r3", "tp2-ep2-r2", "mla-r2", "glm-r3", "qwen3-dense",
        "llama"])
def test_context_parallel_2_step_matches_embedded(tmp_path: Path, tp: str, ep: str, replay: str,
                                                  loss: str, family: str) -> None:
    """CP = 2 (``runtime.megatron.context_parallel``): each rank holds chunks r and 3 − r of
    every micro-batch's positions (padded to a multiple of 4), its attention reads the
    all-gathered keys and values with a causal mask of global positions (SDPAttention; not
    megatron-core 0.16.1's local attention, which asserts CP = 1), the rotary embedding takes
    the same positions (MLA's too: deepseek_v3; qwen3_moe is GQA), R3 traces are split alike
    and R2 records gathered; both ranks get the
    whole log-probs back and compute the same loss, its share counted once. Gradients are
    summed over the data × context-parallel group by megatron-core's DDP. With TP = 2 (four
    ranks; sequence parallelism, positions padded to a multiple of 8) each CP rank's two
    chunks are split again over the TP pair; with EP = 2 too, R2 records are gathered over TP,
    then CP."""
    outs = launch("tests.megatron._train_worker", 2 * int(tp),
                  [tp, ep, str(tmp_path), replay, loss, "cp=2", f"family={family}"], tmp_path)
    for out in outs:
        assert out["cp"] == 2
        _check(out)
    assert _max_diff(outs[0]["got"], outs[1]["got"]) == 0.0


@pytest.mark.parametrize(("replay", "recompute"), [("r3", "full"), ("r2", "full"),
                                                  ("r3", "selective")])
def test_recomputed_activations_replay_the_same_experts(tmp_path: Path, replay: str,
                                                        recompute: str) -> None:
    """``train.recompute: full`` re-runs each layer's forward in the backward pass: its routers
    must replay the experts the forward replayed (megatron-core's REPLAY_BACKWARD queue), or
    the gradient belongs to other experts. Found on an H200 (bench/RESULTS.md §GPU): the
    step's loss and gradient norm were off by 0.5 % and max |Δθ| was twice the step."""
    (out,) = launch("tests.megatron._train_worker", 1,
                    ["1", "1", str(tmp_path), replay, "grpo", "1", recompute], tmp_path)
    _check(out)


@pytest.mark.parametrize("layout", [["1", "2"], ["1", "1", "2", "vpp=2", "layers=6", "last=4"],
                                    ["1", "2", "dtype=bfloat16"]],
                         ids=["ep-2", "vpp-2-uneven", "ep-2-bf16"])
def test_checkpoint_resume_is_exact(tmp_path: Path, layout: list[str]) -> None:
    """A Megatron distributed checkpoint (dist_checkpointing, the distributed optimizer's
    shards dp-reshardable) restores weights, Adam moments and step: a trainer of other weights
    that loads it takes the next step exactly as the one that saved it (EP = 2, DP = 2; and
    PP = 2 with two uneven model chunks per rank). In bf16 (``train.precision: bf16``'s model,
    fp32 master weights and gradients) the fp32 master weights must come back too: restored
    from the bf16 weights alone, the next step would start from rounded values."""
    tp, ep, *rest = layout
    outs = launch("tests.megatron._train_worker", 2,
                  [tp, ep, str(tmp_path), "resume", "-", *rest], tmp_path)
    assert (tmp_path / "checkpoint" / "metadata.json").is_file()
    for out in outs:
        assert out["steps_after_load"] == 4 and out["steps"] == 8
        assert _max_diff(out["a"], out["b"]) == 0.0


@pytest.mark.parametrize(("recompute", "expected"), [
    ("none", (None, None, None)),
    ("selective", ("selective", None, None)),
    ("full", ("full", "uniform", 1)),
])
def test_the_spec_recompute_reaches_the_megatron_models_config(
        tmp_path: Path, megatron_cpu: None, recompute: str, expected: tuple) -> None:
    """``train.recompute`` → train.sh's --recompute-* flags → the train job's model overrides
    (``runtime.megatron.args.model_overrides``, what ``MegatronTrainerProcess`` builds with) →
    the GPTModel's TransformerConfig (world 1, in this process)."""
    from runtime.megatron.args import model_overrides, parse_megatron_args
    from runtime.megatron.model import build_gpt_chunks
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.preflight import trainer_argv
    from tests.megatron._worker import tiny_hf_policy
    from tests.runtime.test_megatron_args import tiny_megatron_train_sh

    text, _ = tiny_megatron_train_sh(tmp_path, train={"recompute": recompute})
    overrides = model_overrides(parse_megatron_args(trainer_argv(text)))
    hf = tiny_hf_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        (model,) = build_gpt_chunks(hf.config, pg, **overrides)
        config = model.config
        assert (config.recompute_granularity, config.recompute_method,
                config.recompute_num_layers) == expected
        assert model.decoder.config.recompute_granularity == expected[0]
    finally:
        destroy_parallel()
