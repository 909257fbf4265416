"""FP8 rollouts on the embedded engine (``rollout.fp8``): the quantizer, the engine, the job wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from runtime.policy import build_policy, build_tokenizer
from runtime.rollout.engine import LocalEngine
from runtime.rollout.fp8 import E4M3_MAX, fp8_parameter_names, quantize_fp8_, round_fp8
from tests.runtime.engine_probes import MIXED_PROMPTS as PROMPTS
from tests.runtime.engine_probes import full_logprobs

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")

# e4m3: 3 mantissa bits (half an ulp is 2⁻⁴ of the value), subnormal step 2⁻⁹ of the scale.
REL = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10


# ------------------------------------------------------------------------------ quantizer


def test_rounding_error_is_bounded_per_output_channel() -> None:
    g = torch.Generator().manual_seed(0)
    # Channels of very different magnitudes (a per-tensor scale would flush the small ones).
    w = torch.randn(3, 24, 40, generator=g) * torch.logspace(-4, 2, 24)[None, :, None]
    w[1, 5] = 0.0  # an all-zero channel stays zero
    q = round_fp8(w)
    assert q.shape == w.shape and q.dtype == w.dtype
    scale = w.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    err = (w - q).abs()
    assert bool((err <= REL * w.abs() + SUBNORMAL_HALF_STEP * scale + 1e-12).all())
    # Each channel's largest entry is exact; the rounding does change the weights.
    idx = w.abs().argmax(dim=-1, keepdim=True)
    torch.testing.assert_close(q.gather(-1, idx), w.gather(-1, idx), rtol=2e-7, atol=0)
    assert torch.equal(q[1, 5], torch.zeros(40))
    rel = (err / w.abs().clamp_min(1e-30))[w.abs() > 64 * scale]  # normal range
    assert 0.005 < float(rel.mean()) < REL
    # The values lie on the e4m3 grid × scale (up to fp32's rounding of the product).
    grid = q / torch.where(scale > 0, scale, 1)
    torch.testing.assert_close(grid.to(torch.float8_e4m3fn).float(), grid, rtol=1e-6, atol=0)


def test_rounding_is_idempotent_in_fp32_and_bf16() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    q = round_fp8(w)
    assert torch.equal(round_fp8(q), q)
    b = round_fp8(w.bfloat16())
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(round_fp8(b), b, rtol=2**-8, atol=0)


def test_a_vector_is_refused() -> None:
    with pytest.raises(ValueError, match="output and an input dimension"):
        round_fp8(torch.ones(8))


def _arch(family: str) -> dict:
    if family == "qwen3_moe":
        return dict(family="qwen3_moe", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, head_dim=32, vocab_size=64,
                    max_position_embeddings=256,
                    moe=dict(num_experts=8, top_k=2, expert_ffn_hidden_size=64))
    return dict(family="deepseek_v3", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, attention="mla", vocab_size=64, max_position_embeddings=256,
                tie_embeddings=True,
                mla=dict(q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                         v_head_dim=16),
                moe=dict(num_experts=8, top_k=2, expert_ffn_hidden_size=32, score_function="sigmoid",
                         shared_experts=1, first_dense_layers=1))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_quantize_rounds_linear_and_expert_weights_and_leaves_the_rest(family: str) -> None:
    model = build_policy(_arch(family), build_tokenizer(64), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = quantize_fp8_(model)
    assert names == fp8_parameter_names(model)
    after = dict(model.named_parameters())
    for name in names:  # each rounded weight is its own rounding, and changed
        assert torch.equal(after[name], round_fp8(before[name])), name
        assert not torch.equal(after[name], before[name]), name
    for name in set(before) - set(names):  # embeddings, lm_head, norms, routers, biases
        assert torch.equal(after[name], before[name]), name
    rounded = set(names)
    expected_kept = {n for n in before if n.endswith(("embed_tokens.weight", "lm_head.weight",
                                                      "norm.weight", "mlp.gate.weight",
                                                      "e_score_correction_bias"))}
    assert expected_kept and not expected_kept & rounded
    layer = "model.layers.1."
    for part in ("self_attn.o_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        assert layer + part in rounded
    if family == "qwen3_moe":
        assert {layer + f"self_attn.{p}_proj.weight" for p in "qkv"} <= rounded
    else:  # MLA's low-rank projections, the shared expert and the leading dense MLP
        assert {layer + "self_attn.q_a_proj.weight", layer + "self_attn.kv_b_proj.weight",
                layer + "mlp.shared_experts.down_proj.weight",
                "model.layers.0.mlp.gate_proj.weight"} <= rounded
    # Idempotent on the model: a second pass changes nothing.
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize_fp8_(model)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------ engine


def _reference(path: Path, fp8: bool) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    if fp8:
        quantize_fp8_(model)
    return model


def _gaps(engine: LocalEngine, model: torch.nn.Module) -> np.ndarray:
    outs = engine.generate(PROMPTS, n=4, max_tokens=10, seed=3, ignore_eos=True)
    return np.concatenate([np.abs(s.logprobs - full_logprobs(model, o.prompt_token_ids, s.token_ids))
                           for o in outs for s in o.samples])


def test_fp8_engine_serves_the_rounded_weights_with_a_bounded_gap(
        model_dir: Path, other_weights: Path) -> None:
    plain, fp8 = LocalEngine(model_dir, seed=0), LocalEngine(model_dir, seed=0, fp8=True)
    assert plain.fp8_parameters == [] and len(fp8.fp8_parameters) == 12
    trainer = _reference(model_dir, fp8=False)  # the trainer's (unquantized) weights
    # The FP8 engine's log-probs are exactly those of the FP8-rounded model...
    assert _gaps(fp8, _reference(model_dir, fp8=True)).max() < 1e-4
    # ... and differ from the trainer's measurably, boundedly; the plain engine's do not.
    fp8_gap, plain_gap = _gaps(fp8, trainer), _gaps(plain, trainer)
    assert plain_gap.mean() < 1e-5
    assert 1e-2 < fp8_gap.mean() < 0.5, fp8_gap.mean()
    assert fp8_gap.max() < 5.0
    # A weight update is rounded too (and the plain engine takes it unrounded).
    fp8.load_weights(other_weights, version="1")
    plain.load_weights(other_weights, version="1")
    assert _gaps(fp8, _reference(other_weights, fp8=True)).max() < 1e-4
    assert _gaps(plain, _reference(other_weights, fp8=False)).max() < 1e-4
    assert _gaps(fp8, _reference(other_weights, fp8=False)).mean() > 1e-2


# ------------------------------------------------------------------------------ job wiring


@pytest.mark.parametrize("fp8", [False, True])
def test_the_rl_jobs_rollout_server_serves_fp8_from_the_job_config(tmp_path: Path, model_dir: Path,
                                                                   fp8: bool) -> None:
    """The RL job's embedded server gets --quantization fp8 from its config; the eval and
    screen jobs' embedded engine (sampled.open_engine) rounds its weights likewise."""
    from compiler.api import compile_spec
    from compiler.bundle import write_bundle
    from runtime.jobs.common import JobContext
    from runtime.jobs.rollout_server import build_argv
    from runtime.jobs.sampled import open_engine

    bundle = write_bundle(compile_spec(ROOT / "examples" / "tiny" / "spec.yaml",
                                       [f"rollout.fp8={str(fp8).lower()}",
                                        "system.weight_sync_tolerance=0.5"]).files,
                          tmp_path / "b")
    config = bundle / "jobs" / "rl" / "config.json"
    assert json.loads(config.read_text())["spec"]["rollout"]["fp8"] is fp8
    argv = build_argv(["--config", str(config), "--model", "m", "--port", "8000"], env={})
    assert (argv[argv.index("--quantization") + 1] == "fp8") if fp8 else "--quantization" not in argv
    from runtime.rollout.server_args import parse_args

    assert parse_args(argv, "").quantization == ("fp8" if fp8 else None)
    ctx = JobContext.load(bundle / "jobs" / "eval_before" / "config.json", run_dir=tmp_path,
                          log_to_file=False)
    engine = open_engine(ctx, model_dir, seed=0)
    assert engine.fp8 is fp8 and bool(engine.fp8_parameters) is fp8
