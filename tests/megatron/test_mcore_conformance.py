"""megatron-core GPTModel vs HF Qwen3MoeForCausalLM: same weights, same per-token log-probs;
the export back to HF weights (``gather_full_state_dict`` → ``megatron_to_hf``) is exact.

Tolerance: fp32 on CPU, max |Δ logp| ≤ 1e-4 and max |Δ entropy| ≤ 1e-4 over every scored
position (measured ≈ 1e-6: the two differ only in summation order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron._worker import launch, run

pytestmark = pytest.mark.megatron

ATOL = 1e-4


def _check(out: dict[str, torch.Tensor]) -> None:
    m = out["mask"]
    assert int(m.sum()) > 20
    d_logp = (out["got"] - out["ref"])[m].abs().max().item()
    d_ent = (out["got_h"] - out["ref_h"])[m].abs().max().item()
    assert d_logp <= ATOL, f"max |Δ logp| = {d_logp:.3g}"
    assert d_ent <= ATOL, f"max |Δ entropy| = {d_ent:.3g}"
    # position 0 and padded positions carry nothing
    assert torch.all(out["got"][:, 0] == 0)
    # export: the shards gathered and converted back are the HF weights, bit for bit
    assert out["exported"].keys() == out["hf"].keys()
    for key, value in out["hf"].items():
        assert torch.equal(out["exported"][key], value), key


@pytest.mark.usefixtures("megatron_cpu")
def test_world_size_1_matches_hf(tmp_path: Path) -> None:
    _check(run(0, 1, 1, 1, tmp_path))


@pytest.mark.parametrize(("tp", "ep"), [(2, 2), (2, 1), (1, 2)], ids=["tp2-ep2", "tp2", "ep2"])
def test_world_size_2_matches_hf(tmp_path: Path, tp: int, ep: int) -> None:
    """Two processes, gloo over file:// rendezvous. TP=2 splits attention (one query group
    per rank) and the vocabulary (no sequence parallelism: torch RMSNorm refuses it); EP=2
    puts 4 of the 8 experts on each rank; expert-TP is 1 (whole experts)."""
    for out in launch("tests.megatron._worker", 2, [str(tp), str(ep), str(tmp_path)], tmp_path):
        _check(out)


@pytest.mark.usefixtures("megatron_cpu")
def test_world_size_1_gradients_match_hf(tmp_path: Path) -> None:
    """∂(Σ masked logp)/∂θ: HF's gradients converted with hf_to_megatron (a linear re-layout)
    equal megatron's parameter gradients, max |Δ| ≤ 1e-4 · max |g| (fp32)."""
    from runtime.megatron.hf_weights import hf_to_megatron, load_hf_weights
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.trainer import sequence_logprobs
    from tests.megatron._worker import batch, scored, tiny_hf_policy

    hf = tiny_hf_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        load_hf_weights(model, hf.state_dict(), hf.config)
        ids, mask = batch()
        m = scored(mask)
        sequence_logprobs(hf, ids, mask)[0][m].sum().backward()
        megatron_logprobs(model, ids, mask)[0][m].sum().backward()
        ref = hf_to_megatron({n: p.grad for n, p in hf.named_parameters()}, hf.config)
        scale = max(g.abs().max().item() for g in ref.values())
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            diff = (p.grad - ref[name]).abs().max().item()
            assert diff <= 1e-4 * scale, f"{name}: max |Δ grad| = {diff:.3g} (scale {scale:.3g})"
    finally:
        destroy_parallel()
