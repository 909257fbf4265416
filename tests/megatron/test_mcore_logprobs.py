"""The Megatron trainer's per-token entropies are those of its logits, whatever the batch.

megatron-core's ``vocab_parallel_cross_entropy`` overwrites its input with probabilities, and
that input is the logits themselves wherever ``.float()`` and ``.contiguous()`` copy nothing:
bf16 logits (every GPU run) and fp32 logits of a one-row micro-batch. Entropies read after it
were ln V for every token, which turned ESPO's entropy groups into the responses' first
tokens. The output layer is scaled so that the entropies are far from ln V (the random
policy's are within 0.03 of it). fp32: against HF's entropies of the same weights to 1e-4
(``tests.megatron._match``); bf16: against the entropies of the model's own bf16 logits
(float32 log-softmax), to 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron._match import ATOL
from tests.megatron._worker import batch, scored, tiny_hf_policy

pytestmark = pytest.mark.megatron


def _own_entropy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H[b, t] of softmax(z_{b, t−1}) from the model's logits as ``megatron_logprobs`` runs it."""
    from runtime.megatron.logprobs import _attention_mask

    logits = model(input_ids=ids, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                   attention_mask=_attention_mask(mask))
    logq = torch.log_softmax(logits[:, :-1].float(), -1)
    h = torch.zeros(ids.shape)
    h[:, 1:] = -(logq.exp() * logq).sum(-1)
    return h


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_entropies_are_the_logits_own_for_one_row_and_many(
        tmp_path: Path, dtype: torch.dtype) -> None:
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.trainer import sequence_logprobs

    hf = tiny_hf_policy()
    with torch.no_grad():  # peaked predictions (module doc)
        hf.lm_head.weight.mul_(30.0)
    ids, mask = batch()
    with torch.no_grad():
        ref, ref_h = sequence_logprobs(hf, ids, mask, with_entropy=True)
    assert ref_h is not None
    assert (ref_h[scored(mask)] < 0.8 * torch.log(torch.tensor(64.0))).all()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        load_hf_weights(model, hf.state_dict(), hf.config)
        model = model.to(dtype).eval()
        for rows in (slice(0, 1), slice(1, 2), slice(2, 3), slice(0, 3)):
            m = scored(mask[rows])
            with torch.no_grad():
                got, got_h = megatron_logprobs(model, ids[rows], mask[rows], with_entropy=True)
                want_h = ref_h[rows] if dtype == torch.float32 else _own_entropy(
                    model, ids[rows], mask[rows])
            assert got_h is not None
            d_ent = (got_h - want_h)[m].abs().max().item()
            assert d_ent <= ATOL, f"{dtype} rows {rows}: max |Δ entropy| = {d_ent:.3g}"
            if dtype == torch.float32:
                d_logp = (got - ref[rows])[m].abs().max().item()
                assert d_logp <= ATOL, f"rows {rows}: max |Δ logp| = {d_logp:.3g}"
    finally:
        destroy_parallel()
