r"""The files through which the RL job's three processes meet, and the batch they carry.

Three processes make an RL run (``jobs/rl/launch.sh``): the rollout engine(s)
(``runtime.jobs.rollout_server`` or ``vllm serve``), the trainer (``runtime.jobs.train``)
and the driver (``runtime.jobs.rl``, ``runtime.driver``). They share the run directory::

    artifacts/rl/exchange/batch-<s>.pt     driver → trainer: step s's TrainBatch (atomic)
    artifacts/rl/exchange/done-<s>.json    trainer → driver: metrics of step s (atomic)
    artifacts/rl/exchange/trainer-heartbeat.json   trainer liveness (pid, host, time)
    artifacts/rl/exchange/trainer-error.json       the trainer's failure, one line
    artifacts/rl/weights/v<s+1>/           the policy after step s (HF folder, atomic)
    artifacts/rl/weights/v<s+1>/ipc_update.json   weight_sync ipc: the update body of its
                                           tensors, in the segment /dev/shm/rlspec-<owner>-v<s+1>
    artifacts/rl/exchange/weight-broadcast.json    weight_sync nccl: the trainer's sender
    artifacts/rl/exchange/weight-broadcast.store   its requests and groups (a FileStore;
                                           runtime.rollout.broadcast_transfer)
    artifacts/rl/state/driver.pkl          driver state (``runtime.driver_state``)
    artifacts/rl/metrics.jsonl             one line per complete step
    checkpoints/rl/step-<k>/               trainer checkpoints (model, optimizer, step)

A batch (``build_train_tensors`` + the driver's fields) is a dict of tensors: ``input_ids``,
``attention_mask``, ``loss_mask``, ``rollout_logp`` (the behaviour policy's log-probs),
``advantages``, R3's ``routing_ids`` / ``routing_mask``, and ``step``, ``batch_id``,
``behaviour_version`` (the weights ``v<k>`` that sampled it: ``step`` − its staleness),
``optimizer_steps`` (the schedule position before the step; None when earlier steps are
still being trained, and then ``done-<s−1>.json`` holds it) and ``last``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RunPaths", "build_train_tensors", "routing_shape", "step_of", "write_batch"]


def routing_shape(hf_checkpoint: Path) -> tuple[int | None, int | None, int | None]:
    """(routed experts, MoE layers, top-k) of an HF checkpoint's config.json: the shape of a
    batch's R3 routing tensors (None where the config does not say)."""
    cfg = json.loads((hf_checkpoint / "config.json").read_text())
    experts = (cfg.get("num_experts") or cfg.get("num_local_experts")
               or cfg.get("n_routed_experts"))  # Qwen3-MoE, DeepSeek-V3
    layers = cfg.get("num_hidden_layers")
    dense = len(cfg.get("mlp_only_layers") or []) + int(cfg.get("first_k_dense_replace") or 0)
    return experts, None if layers is None else layers - dense, cfg.get("num_experts_per_tok")


@dataclass(frozen=True)
class RunPaths:
    """Where the three RL processes meet (module doc)."""

    run_dir: Path

    @property
    def root(self) -> Path:
        return self.run_dir / "artifacts" / "rl"

    @property
    def exchange(self) -> Path:
        return self.root / "exchange"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def state(self) -> Path:
        return self.root / "state" / "driver.pkl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / "rl"

    @property
    def owner(self) -> str:
        """This run's name among the node's shared-memory segments (weight_sync ipc)."""
        import hashlib

        return hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:16]

    def batch(self, step: int) -> Path:
        return self.exchange / f"batch-{step}.pt"

    def done(self, step: int) -> Path:
        return self.exchange / f"done-{step}.json"

    def version(self, v: int) -> Path:
        return self.weights / f"v{v}"

    @property
    def heartbeat(self) -> Path:
        return self.exchange / "trainer-heartbeat.json"

    @property
    def trainer_error(self) -> Path:
        return self.exchange / "trainer-error.json"

    @property
    def trainer_finished(self) -> Path:
        return self.exchange / "trainer-finished.json"


def step_of(path: Path) -> int:
    """The step number of ``batch-<s>.pt`` / ``done-<s>.json`` / ``v<s>``."""
    stem = path.name.split(".")[0]
    return int(stem.rsplit("-", 1)[-1].lstrip("v"))


def write_batch(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a partial file, then an atomic rename: the trainer never reads half."""
    import torch

    tmp = path.with_name(f".{path.name}.partial-{payload['batch_id'][:8]}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def build_train_tensors(
    rows: Sequence[tuple[list[int], list[int], np.ndarray, np.ndarray | None]],
    *,
    pad_id: int,
    num_experts: int | None,
    moe_layers: int | None,
    top_k: int | None,
) -> dict[str, Any]:
    """TrainBatch tensors of responses given as (prompt ids, response ids, engine logprobs,
    routed experts or None): prompt + response right-padded, loss mask on the response,
    the engine's logprobs at the response positions, R3 routing aligned and stacked."""
    import torch

    from runtime.router_replay import RoutingTrace, align_routing

    B = len(rows)
    T = max((len(p) + len(r) for p, r, _, _ in rows), default=1)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.bool)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    rollout_logp = torch.zeros((B, T), dtype=torch.float32)
    traces = []
    for b, (prompt, response, logp, routed) in enumerate(rows):
        P, R = len(prompt), len(response)
        ids[b, : P + R] = torch.tensor(prompt + response, dtype=torch.long)
        attention[b, : P + R] = True
        loss_mask[b, P : P + R] = True
        rollout_logp[b, P : P + R] = torch.as_tensor(np.asarray(logp, dtype=np.float32)[:R])
        if routed is not None and num_experts:
            traces.append(align_routing(routed, prompt_len=P, response_len=R,
                                        num_experts=num_experts, moe_layers=moe_layers,
                                        top_k=top_k))
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": attention,
                           "loss_mask": loss_mask, "rollout_logp": rollout_logp,
                           "routing_ids": None, "routing_mask": None, "num_experts": num_experts}
    if traces and len(traces) == B:
        stacked = RoutingTrace.stack(traces, length=T)
        out["routing_ids"], out["routing_mask"] = stacked.ids, stacked.mask
    return out


# --------------------------------------------------------------------------- driver
