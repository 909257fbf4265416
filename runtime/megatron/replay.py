"""R2 / R3 through megatron-core's own ``RouterReplay`` (``moe_enable_routing_replay``).

Layouts. Our traces (``runtime.router_replay.RoutingTrace``) are batch-major: ids
[B, T, L, k], token (b, t) of MoE layer l. megatron-core's routers see hidden states
[T, B, H] flattened sequence-major, so layer l's replay tensor is

    target_l = ids[:, :, l, :].transpose(0, 1).reshape(T · B, k)      (row t · B + b)

and a record [T · B, k] maps back the same way. Without sequence parallelism every
tensor-parallel rank routes all T · B tokens of its micro-batch, so every rank gets the
whole tensor. With it, tensor-parallel rank r holds sequence positions
[r · T/tp, (r+1) · T/tp) of every row, i.e. rows [r · T·B/tp, (r+1) · T·B/tp) of that
sequence-major tensor: it replays that slice, and records are all-gathered over the
tensor-parallel group in rank order.

Masked positions. megatron-core replays every token, the embedded replay only the masked-in
ones. A trace's False positions are therefore filled with experts 0..k−1, which is exact only
where no loss or later position reads them: padding and each sequence's last position (see
``runtime.router_replay.align_routing``). That holds when each row's mask is True on a prefix
and False after it; any other mask (``prompt_start`` > 0 without a prefix) is refused.

Model chunks (virtual pipeline stages) replay and record their own routers only:
:func:`router_layers` finds each chunk's among ``RouterReplay``'s instances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from torch import Tensor

from runtime.megatron.parallel import all_gather, comm_device
from runtime.router_replay import RoutingMismatch, RoutingTrace

__all__ = ["MegatronReplay", "from_megatron_layout", "router_layers", "to_megatron_layout"]


def to_megatron_layout(trace: RoutingTrace) -> list[Tensor]:
    """Per MoE layer, the [T · B, k] long tensor megatron-core replays (module doc)."""
    ids = trace.ids.long()
    if ids.dim() != 4:
        raise RoutingMismatch(f"need a batch trace [B, T, L, k], got {tuple(ids.shape)}")
    b, t, layers, k = ids.shape
    if trace.mask is not None:
        mask = trace.mask
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise RoutingMismatch(
                "megatron-core's RouterReplay replays every token, but this trace lacks the "
                "experts of positions inside a sequence (rollouts with prompt_start > 0 and no "
                "prefix); request routed experts from the first prompt token")
        filler = torch.arange(k).expand(b, t, layers, k)
        ids = torch.where(mask[:, :, None, None], ids, filler)
    return [ids[:, :, i, :].transpose(0, 1).reshape(t * b, k).contiguous() for i in range(layers)]


def from_megatron_layout(per_layer: list[Tensor], batch: int, length: int) -> Tensor:
    """Records [T · B, k] per layer → ids [B, T, L, k] (inverse of :func:`to_megatron_layout`)."""
    return torch.stack([r.view(length, batch, -1).transpose(0, 1) for r in per_layer], dim=2)


class MegatronReplay:
    """``RouterReplayGroup``'s interface (``replaying``, ``recording``) over megatron-core's
    global ``RouterReplay`` instances of one model (one per MoE layer, in the order they were
    built; under pipeline parallelism the stage's own, MoE layers ``first_layer``… of the
    model, or with model chunks (virtual pipeline stages) ``layers``: the model's MoE-layer
    index of each instance).

    ``instances`` (of :meth:`replaying` / :meth:`recording`): the positions, among those
    instances, of the routers the block's forwards run (one model chunk's, for the
    interleaved schedule, which runs one chunk per forward step); the others are left as
    they are, so that each chunk's backward-replay queue holds its own forwards only."""

    def __init__(self, sequence_parallel: bool = False, first_layer: int = 0,
                 total_layers: int | None = None, layers: Sequence[int] | None = None) -> None:
        if not RouterReplay.global_router_replay_instances:
            raise RuntimeError("build the model with routing_replay=True "
                               "(moe_enable_routing_replay) for router replay")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp = tp if sequence_parallel else 1
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if self.tp > 1 else 0
        # the model's MoE-layer index of each instance
        self.layers = (list(layers) if layers is not None
                       else list(range(first_layer, first_layer + len(self))))
        if len(self.layers) != len(self):
            raise ValueError(f"{len(self.layers)} layer indices for {len(self)} routers")
        self.total_layers = len(self) if total_layers is None else total_layers

    def _routers(self, instances: Sequence[int] | None) -> list[tuple[int, RouterReplay]]:
        """(model MoE-layer index, router) of ``instances`` (all when None)."""
        routers = RouterReplay.global_router_replay_instances
        chosen = range(len(routers)) if instances is None else instances
        return [(self.layers[i], routers[i]) for i in chosen]

    def __len__(self) -> int:
        return len(RouterReplay.global_router_replay_instances)

    @contextmanager
    def replaying(self, trace: RoutingTrace, *, backward: bool = False,
                  instances: Sequence[int] | None = None) -> Iterator[MegatronReplay]:
        """Forwards inside the block route every token to the trace's experts.

        ``backward``: the block's forward will be recomputed in the backward pass (activation
        recomputation, ``train.recompute: full``): afterwards each router replays its queued
        experts there (megatron-core's REPLAY_BACKWARD pops them in forward order) instead of
        routing freely, which would give the gradient of other experts than the forward
        used. :meth:`finish_backward` clears what is left once the backward passes ran."""
        layers = to_megatron_layout(trace)
        if len(layers) != self.total_layers:
            raise RoutingMismatch(f"trace has {len(layers)} MoE layers, the model has "
                                  f"{self.total_layers}")
        routers = self._routers(instances)
        for layer, router in routers:
            target = layers[layer]
            if self.tp > 1:  # this rank's sequence shard (module doc)
                rows = target.shape[0] // self.tp
                target = target[self.tp_rank * rows:(self.tp_rank + 1) * rows]
            router.set_target_indices(target)  # also queues it for REPLAY_BACKWARD
            router.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        try:
            yield self
        finally:
            for _, router in routers:
                if backward:
                    router.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
                else:
                    router.clear_router_replay_action()
                    router.clear_indices()

    def finish_backward(self) -> None:
        """End the replays of :meth:`replaying` (``backward=True``) after their backward."""
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()

    @contextmanager
    def recording(self, instances: Sequence[int] | None = None) -> Iterator[list[Tensor]]:
        """Record the experts of the forward inside the block; the yielded list holds the
        per-layer [T · B, k] records of ``instances`` afterwards (see
        :func:`from_megatron_layout`)."""
        records: list[Tensor] = []
        routers = [router for _, router in self._routers(instances)]
        for router in routers:
            router.set_router_replay_action(RouterReplayAction.RECORD)
        try:
            yield records
            got = [r.get_recorded_indices().clone() for r in routers]  # type: ignore[union-attr]
            if self.tp > 1:
                got = [_gather_sequence(r) for r in got]
            records.extend(got)
        finally:
            for router in routers:
                router.clear_router_replay_action()
                router.clear_indices()


def _gather_sequence(record: Tensor) -> Tensor:
    """The tensor-parallel ranks' sequence shards of a record, concatenated in rank order."""
    parts = all_gather(record.to(comm_device()),
                       parallel_state.get_tensor_model_parallel_world_size(),
                       parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts).to(record.device)


def router_layers(chunks: list[GPTModel], pattern: list[int]) -> list[list[tuple[int, int]]]:
    """Per model chunk, (position among RouterReplay's instances, the model's MoE-layer
    index) of each of its routers, in layer order."""
    everyone = {id(r): i for i, r in enumerate(RouterReplay.global_router_replay_instances)}
    out = []
    for chunk in chunks:
        found = []
        for layer in chunk.decoder.layers:
            router = getattr(getattr(layer.mlp, "router", None), "router_replay", None)
            if router is not None:  # layer_number: 1-based, in the whole model
                found.append((everyone[id(router)], sum(pattern[:layer.layer_number - 1])))
        out.append(found)
    return out
