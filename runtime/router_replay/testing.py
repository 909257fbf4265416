"""A small torch MoE block (``MoEBlock``) used by the tests and benches.

y_t = Σ_{i∈sel(t)} g_{t,i} · W_down,i (silu(W_gate,i x_t) ⊙ W_up,i x_t), with (g, sel) from
the block's ``RouterReplay`` (``select_experts`` on the router logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.router_replay.replay import RouterReplay
from runtime.router_replay.selection import ScoreFunction

__all__ = ["MoEBlock"]


class MoEBlock(nn.Module):
    """Top-k routed MoE feed-forward block with SwiGLU experts.

    y_t = Σ_{i∈sel(t)} g_{t,i} · W_down,i (silu(W_gate,i x_t) ⊙ W_up,i x_t), with
    (g, sel) = ``select_experts(router(x_t), ...)`` consulting ``self.router_replay``.
    ``expert_bias=True`` adds a (non-trained) per-expert selection bias buffer, as in
    DeepSeek-V3's auxiliary-loss-free balancing.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        score_function: ScoreFunction = "softmax",
        expert_bias: bool = False,
        norm_topk_prob: bool = True,
        layer: int = 0,
    ) -> None:
        super().__init__()
        if score_function not in ("softmax", "sigmoid"):
            raise ValueError(
                f"score_function must be 'softmax' or 'sigmoid', got {score_function!r}"
            )
        self.hidden = hidden
        self.ffn_hidden = ffn_hidden
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_function: ScoreFunction = score_function
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.expert_bias: torch.Tensor | None
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        self.router_replay = RouterReplay(num_experts, top_k, layer=layer)
        self.reset_parameters()

    @property
    def replay(self) -> RouterReplay:
        return self.router_replay

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.hidden**-0.5)
        nn.init.normal_(self.gate_up_proj, std=self.hidden**-0.5)
        nn.init.normal_(self.down_proj, std=self.ffn_hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.hidden)
        logits = self.router(flat)
        gates, ids = self.router_replay.route(
            logits,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            norm_topk_prob=self.norm_topk_prob,
        )
        return self._experts(flat, ids, gates.to(flat.dtype)).reshape(shape)

    def _experts(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_idx = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        dispatched = x.index_select(0, token_idx)
        outputs = []
        for e, chunk in enumerate(dispatched.split(counts)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        out = torch.cat(outputs) * gates.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, token_idx, out)
