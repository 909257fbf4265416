"""The Megatron trainer in the clusters' usual software: NGC images ship apex (and often
TransformerEngine), which megatron-core 0.16.1 picks up on import.

* apex importable: megatron's local layer spec makes the decoder block's final norm apex's
  ``FusedLayerNorm`` (gpt_layer_specs' ``LNImpl``), which refuses RMSNorm when built; the
  trainer's model replaces it by a torch norm and still equals HF.
* TE's / apex's FusedAdam as megatron's Adam: the step count lives in the param groups, and
  TE's ``state_dict`` raises KeyError on a per-parameter ``step``, which ``set_adam_step``
  (needed by torch's Adam on a resume) must not write there.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.megatron._match import check_against_hf
from tests.megatron._worker import tiny_hf_policy

pytestmark = pytest.mark.megatron


@pytest.mark.usefixtures("megatron_cpu")
def test_the_model_builds_and_equals_hf_where_apex_imports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models.gpt import gpt_layer_specs

    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)  # what `import apex` sets
    hf = tiny_hf_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        assert not isinstance(model.decoder.final_layernorm, FusedLayerNorm)
        load_hf_weights(model, hf.state_dict(), hf.config)
        check_against_hf(hf, model)
    finally:
        destroy_parallel()


class FusedAdam(torch.optim.Optimizer):
    """TransformerEngine's FusedAdam as far as a resume sees it: its ``state_dict`` looks up
    each per-parameter state name in a map of its moments and master weights."""

    STATE = ("exp_avg", "exp_avg_sq", "master_param")

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 1e-3, "step": 3})

    def state_dict(self) -> dict[str, Any]:
        for state in self.state.values():
            for name in state:
                if name not in self.STATE:
                    raise KeyError(name)
        return super().state_dict()


def test_a_resume_sets_torch_adams_step_and_leaves_fused_adam_alone() -> None:
    from runtime.megatron.checkpoint import set_adam_step

    torch_adam = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    fused = FusedAdam([torch.nn.Parameter(torch.ones(3))])
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=torch_adam),
                                                  SimpleNamespace(optimizer=fused)])
    set_adam_step(chained, 7)
    (state,) = torch_adam.state.values()
    assert state["step"].item() == 7.0 and not state["exp_avg"].any()
    assert fused.state_dict()["param_groups"][0]["step"] == 3  # the group keeps its count
