"""The rollout client behind the embedded engine's ``generate``: jobs served by vLLM.

The screen and eval jobs sample through ``runtime.jobs.sampled.sample_texts``, written against
``LocalEngine``: ``tokenizer``, ``decode``, ``model_dir`` and ``generate(prompts, n=..., ...)``
returning one ``PromptOutput`` per prompt. With ``rollout.engine: vllm`` their launch script
starts ``vllm serve`` replicas on every node of the job (the RL job's rollout.sh) and exports
their URLs; ``RemoteEngine`` answers the same calls from them through the RL driver's
``RolloutClient``, which spreads the prompts over every replica of every node. Sample j of a
prompt is seeded ``seed + j`` on both engines, so the split does not change what is sampled.
The checkpoint's own tokenizer encodes and decodes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.errors import JobError
from runtime.rollout.client import RolloutClient
from runtime.rollout.engine import PromptOutput, SampleOutput

__all__ = ["RemoteEngine", "engine_endpoints"]


def engine_endpoints(env: dict[str, str] | None = None) -> list[str]:
    """``RLSPEC_ROLLOUT_ENDPOINTS``: the comma-separated engine URLs a launch script exports."""
    env = dict(os.environ if env is None else env)
    raw = [e.strip() for e in env.get("RLSPEC_ROLLOUT_ENDPOINTS", "").split(",") if e.strip()]
    if not raw:
        raise JobError("RLSPEC_ROLLOUT_ENDPOINTS is not set: run the job through its launch.sh, "
                       "which starts the engines")
    return raw


class RemoteEngine:
    """``LocalEngine``'s sampling interface over ``vllm serve`` replicas of ``model_dir``."""

    def __init__(self, model_dir: Path, endpoints: Sequence[str], *,
                 startup_timeout_s: float, request_timeout_s: float,
                 max_num_seqs: int = 256, stall_s: float | None = None,
                 on_stall: Any = None) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.client = RolloutClient(endpoints, timeout_s=request_timeout_s,
                                    max_num_seqs=max_num_seqs, stall_s=stall_s,
                                    on_stall=on_stall)
        #: sequences the replicas run at once, all together (``max_num_seqs`` each)
        self.batch_sequences = len(endpoints) * max_num_seqs
        # every replica must serve this job's checkpoint (not a stale engine on the port)
        self.client.wait_ready(timeout=startup_timeout_s, model_root=str(self.model_dir))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int = 1, max_tokens: int = 16,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop_token_ids: Sequence[int] = (),
                 **unused: Any) -> list[PromptOutput]:
        if unused:
            raise TypeError(f"RemoteEngine.generate does not take {sorted(unused)}")
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                    "top_k": max(0, top_k), "seed": seed, "stop_token_ids": list(stop_token_ids)}
        results = self.client.generate(prompts, n=n, sampling=sampling)
        return [PromptOutput(list(map(int, prompt)), [
            SampleOutput(c.token_ids, c.logprobs, c.finish_reason,
                         c.stop_reason if isinstance(c.stop_reason, int) else None,
                         None, c.weight_versions) for c in completions])
            for prompt, completions in zip(prompts, results, strict=True)]

    def close(self) -> None:
        self.client.close()
