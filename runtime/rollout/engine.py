"""Embedded rollout engine: batched, KV-cached sampling from a Hugging Face causal LM.

``LocalEngine`` is the torch counterpart of a vLLM replica for the embedded (CPU /
single-GPU) runs: it loads the policy with transformers from a checkpoint directory,
samples ``n`` continuations of every prompt in one batch, and returns what the RL
runtime needs from vLLM: token ids, the per-token logprob of every sampled token,
the finish reason and, for MoE models, the experts every token was routed to.

Batching. The prompts are prefilled once each (the n samples of a prompt share the
prefill, as vLLM's prefix cache makes them), left-padded into one [U, P] batch with
an attention mask and per-row position ids; the cache is then repeated n times and
all U·n sequences decode together, one [rows, 1] forward per token. Finished rows
are dropped from the batch (and the KV cache) so that long tails do not pay for
finished sequences. No Python loop over sequences runs inside the token loop.

Sampling and logprobs: ``runtime.rollout.sampling``; outputs (routed experts included):
``runtime.rollout.outputs``; pausing: ``runtime.rollout.pausing``.

Routed experts (R3). With ``return_routed_experts`` the engine records, with
``runtime.router_replay.patch_moe_routers``, the top-k expert ids every MoE layer
chose in the engine's own forwards: the prefill routes the prompt, each decode step
routes only the token fed in (the KV cache holds the rest).

Weights. ``load_weights(path, version)`` swaps a checkpoint of the same architecture
in place (read by ``runtime.rollout.checkpoint``), so the patched routers stay. Every
sample reports the weight version(s) that produced its tokens as ``WeightVersionSpan`` s.
Sleep mode (vLLM's ``sleep`` / ``wake_up`` / ``is_sleeping``, for colocated placement)
releases the parameters' storage; it is ``runtime.rollout.sleeping``'s.
With ``fp8=True`` (``rollout.fp8``, vLLM's ``--quantization fp8``) the linear and expert
weights are rounded through float8_e4m3fn at load and after every ``load_weights``
(``runtime.rollout.fp8``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from runtime.rollout.checkpoint import read_checkpoint
from runtime.rollout.fp8 import quantize_fp8_
from runtime.rollout.outputs import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineError,
    PromptOutput,
    SampleOutput,
    _Spans,
    collect_outputs,
)
from runtime.rollout.pausing import PauseControl
from runtime.rollout.sampling import (
    _GREEDY_EPS,
    LogprobsMode,
    _sequence_keys,
    prompt_logprobs_of,
    sample_tokens,
)
from runtime.rollout.sleeping import SleepControl
from runtime.router_replay import RouterReplayGroup, patch_moe_routers, storage_dtype

__all__ = [
    "FINISH_ABORT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "EngineError",
    "LocalEngine",
    "LogprobsMode",
    "PromptOutput",
    "SampleOutput",
]


class LocalEngine(SleepControl, PauseControl):
    """Batched KV-cached sampler over a transformers causal LM (see the module docstring).

    Thread-safe: generations and weight loads serialise on one lock; ``pause`` /
    ``resume`` / version queries never wait for a generation.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        max_model_len: int | None = None,
        fp8: bool = False,
        enable_sleep_mode: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(
                f"logprobs_mode must be raw_logprobs or processed_logprobs, got {logprobs_mode!r}"
            )
        self.model_dir = os.fspath(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype,
                                                          use_kernels=False)  # see load_policy
        self.model.to(self.device).eval()
        # FP8 serving (runtime.rollout.fp8): the weights it rounds, at load and every update.
        self.fp8 = bool(fp8)
        self.fp8_parameters: list[str] = quantize_fp8_(self.model) if self.fp8 else []
        self.tokenizer = self._load_tokenizer()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        limit = getattr(self.config, "max_position_embeddings", None)
        self.max_model_len = int(max_model_len or limit or 4096)
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self._pad_id()
        # A dense model has no router: routed experts cannot be returned for it.
        self.router_group: RouterReplayGroup | None
        try:
            self.router_group = patch_moe_routers(self.model)
        except (ValueError, ImportError):
            self.router_group = None
        self.weight_version = "default"  # vLLM's initial version string
        self.generated_tokens = 0  # vLLM's generation_tokens counter (the server's /metrics)
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()  # numpy generators are not thread-safe
        self._lock = threading.Lock()  # model + weights
        self._init_pause()
        self._init_sleep(enable_sleep_mode)

    # -- properties -----------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return 0 if self.router_group is None else len(self.router_group)

    @property
    def top_k_experts(self) -> int:
        return 0 if self.router_group is None else self.router_group[0].top_k

    @property
    def num_experts(self) -> int:
        return 0 if self.router_group is None else self.router_group[0].num_experts

    def _load_tokenizer(self) -> Any:
        # The tokenizer only renders ``text``; token-id prompts work without one.
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any(os.path.exists(os.path.join(self.model_dir, n)) for n in names):
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError):
            return None

    def _eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        sources = [getattr(self.config, "eos_token_id", None)]
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            sources.append(getattr(gen, "eos_token_id", None))
        if self.tokenizer is not None:
            sources.append(getattr(self.tokenizer, "eos_token_id", None))
        for src in sources:
            for v in src if isinstance(src, list | tuple) else [src]:
                if v is not None and int(v) not in ids:
                    ids.append(int(v))
        return tuple(ids)

    def _pad_id(self) -> int:
        for v in (
            getattr(self.config, "pad_token_id", None),
            getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None,
            self.eos_token_ids[0] if self.eos_token_ids else None,
        ):
            if v is not None:
                return int(v)
        return 0  # masked out everywhere; any valid id does

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def set_weight_version(self, version: str) -> None:
        self.weight_version = str(version)
    # -- weights ------------------------------------------------------------------------
    def load_weights(self, path: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                     version: str | None = None) -> None:
        """Swap in the weights stored at ``path`` (same architecture); all-or-nothing.

        ``path``: a checkpoint directory (every ``*.safetensors`` in it, sharded or not),
        one ``.safetensors`` file, or the tensors (name → tensor), with checkpoint
        (per-expert) or module (fused) parameter names. ``version`` (if given) becomes the
        weight version."""
        self._check_weights_awake()
        new_state = read_checkpoint(self.model, self.config, self.dtype, path)
        with self._lock, torch.no_grad():
            self._check_weights_awake()
            live = self.model.state_dict()
            for k, t in live.items():
                t.copy_(new_state[k].to(device=t.device, dtype=t.dtype))
            if self.fp8:
                quantize_fp8_(self.model, self.fp8_parameters)
            if version is not None:
                self.weight_version = str(version)
            self._weights_loaded()

    # -- generation ---------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        return_routed_experts: bool = False,
        routed_experts_prompt_start: int = 0,
        num_logprobs: int | None = None,
        prompt_logprobs: bool = False,
    ) -> list[PromptOutput]:
        """Sample ``n`` continuations of every prompt; one ``PromptOutput`` per prompt (with
        ``prompt_logprobs``: vLLM's ``prompt_logprobs=0``, ``sampling.prompt_logprobs_of``)."""
        prompts = [list(map(int, p)) for p in prompts]
        self._validate(
            prompts, n, max_tokens, temperature, top_p, top_k, routed_experts_prompt_start
        )
        if return_routed_experts and self.router_group is None:
            raise EngineError("routed experts requested, but the served model has no MoE routers")
        # Per-sequence keys are drawn before admission so that the engine generator
        # advances in request order, not in the order requests got the lock.
        if seed is None:
            with self._rng_lock:
                draws = self._rng.integers(0, 2**63 - 1, size=len(prompts) * n)
            seq_seeds = [int(s) for s in draws]
        else:
            seq_seeds = [seed + j for _ in prompts for j in range(n)]
        with self._admitted() as epoch, self._lock, torch.inference_mode():
            outputs = self._generate_locked(
                prompts,
                n=n,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seq_seeds=seq_seeds,
                stop_token_ids=tuple(int(t) for t in stop_token_ids),
                ignore_eos=ignore_eos,
                record=return_routed_experts,
                prompt_start=routed_experts_prompt_start,
                num_logprobs=num_logprobs,
                epoch=epoch,
            )
            return [replace(o, prompt_logprobs=prompt_logprobs_of(self.model, p, self.device))
                    if prompt_logprobs else o for o, p in zip(outputs, prompts, strict=True)]

    def _validate(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        prompt_start: int,
    ) -> None:
        if not prompts:
            raise EngineError("no prompts")
        if n < 1 or max_tokens < 1:
            raise EngineError(f"n and max_tokens must be ≥ 1, got n={n}, max_tokens={max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < -1:
            raise EngineError(
                f"bad sampling parameters T={temperature}, top_p={top_p}, top_k={top_k}"
            )
        for i, p in enumerate(prompts):
            if not p:
                raise EngineError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise EngineError(f"prompt {i} has token ids outside [0, {self.vocab_size})")
            if len(p) >= self.max_model_len:
                raise EngineError(
                    f"prompt {i} has {len(p)} tokens; this model's maximum context length is "
                    f"{self.max_model_len} (at least one output token is needed)"
                )
            if not 0 <= prompt_start < len(p):
                raise EngineError(
                    f"routed_experts_prompt_start={prompt_start} must be in [0, {len(p)}) for prompt {i}"
                )

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        record: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One cached forward; returns last-position logits [rows, V] (float32) and, when
        recording, the routed ids [rows, T, L, k] of every token fed in."""
        routes: torch.Tensor | None = None
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if record:
            assert self.router_group is not None
            with self.router_group.recording() as rec:
                out = self.model(**kwargs)
            rows, t = input_ids.shape
            routes = rec.trace.ids.view(rows, t, self.num_moe_layers, self.top_k_experts)
        else:
            out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), routes

    def _generate_locked(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seq_seeds: list[int],
        stop_token_ids: tuple[int, ...],
        ignore_eos: bool,
        record: bool,
        prompt_start: int,
        num_logprobs: int | None,
        epoch: int,
    ) -> list[PromptOutput]:
        from transformers import DynamicCache

        dev = self.device
        num_prompts = len(prompts)
        rows_total = num_prompts * n
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        width = int(lengths.max())

        # Prefill: one left-padded batch of the distinct prompts.
        ids = torch.full((num_prompts, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((num_prompts, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.config)

        aborted = self._checkpoint(epoch)
        spans = _Spans([(self.weight_version, 0)])
        prompt_routes: list[torch.Tensor] = []
        logits = torch.empty(0)
        if not aborted:
            logits, routes = self._forward(ids, mask, positions, cache, record)
            if routes is not None:
                routes = routes.to(device="cpu", dtype=self._route_dtype())
                prompt_routes = [routes[i, width - len(p) :] for i, p in enumerate(prompts)]
            # The n samples of a prompt share its prefill: repeat rows (and the cache).
            if n > 1:
                cache.batch_repeat_interleave(n)
                logits = logits.repeat_interleave(n, dim=0)
                mask = mask.repeat_interleave(n, dim=0)
                positions = positions.repeat_interleave(n, dim=0)

        # Output buffers for every sequence; rows of the live batch map to ``active``.
        tokens_out = torch.zeros((rows_total, max_tokens), dtype=torch.long, device=dev)
        logp_out = torch.zeros((rows_total, max_tokens), dtype=torch.float32, device=dev)
        top_ids_out = top_lp_out = None
        if num_logprobs:
            top_ids_out = torch.zeros(
                (rows_total, max_tokens, num_logprobs), dtype=torch.long, device=dev
            )
            top_lp_out = torch.zeros(
                (rows_total, max_tokens, num_logprobs), dtype=torch.float32, device=dev
            )
        routes_out = None
        if record:
            routes_out = torch.zeros(
                (rows_total, max(max_tokens - 1, 1), self.num_moe_layers, self.top_k_experts),
                dtype=self._route_dtype(),
                device=dev,
            )
        out_len = torch.zeros(rows_total, dtype=torch.long, device=dev)
        finish = torch.zeros(rows_total, dtype=torch.int8, device=dev)
        stop_reason = torch.full((rows_total,), -1, dtype=torch.long, device=dev)

        active = torch.arange(rows_total, device=dev)
        seq_len = lengths.repeat_interleave(n).to(dev)
        # vLLM's get_max_tokens: never run past the model's context.
        limit = torch.clamp(self.max_model_len - seq_len, max=max_tokens)
        keys = _sequence_keys(seq_seeds).to(dev)
        last_pos = positions[:, -1]
        eos = torch.tensor(
            [] if ignore_eos else list(self.eos_token_ids), dtype=torch.long, device=dev
        )
        stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=dev)
        greedy = temperature < _GREEDY_EPS

        if aborted:
            finish[:] = 3
        logits_version = self.weight_version
        for step in range(max_tokens):
            if aborted:
                break
            # The version that computed these logits is the one that samples the token.
            spans.note(logits_version, step)
            tok, lp, top = self._sample(
                logits, keys, step, greedy, temperature, top_p, top_k, num_logprobs
            )
            tokens_out[active, step] = tok
            logp_out[active, step] = lp
            self.generated_tokens += int(tok.numel())
            if top is not None and top_ids_out is not None and top_lp_out is not None:
                top_ids_out[active, step] = top[0]
                top_lp_out[active, step] = top[1]
            out_len[active] = step + 1
            # vLLM's check_stop order: EOS, then stop_token_ids, then length.
            is_eos = torch.isin(tok, eos)
            is_stop = torch.isin(tok, stops) & ~is_eos
            is_len = (step + 1 >= limit) & ~is_eos & ~is_stop
            done = is_eos | is_stop | is_len
            if bool(done.any()):
                finish[active[is_eos | is_stop]] = 1
                finish[active[is_len]] = 2
                stop_reason[active[is_stop]] = tok[is_stop]
                keep = ~done
                if not bool(keep.any()):
                    break
                idx = keep.nonzero().squeeze(1)
                cache.batch_select_indices(idx)
                active, tok, keys, limit = active[idx], tok[idx], keys[idx], limit[idx]
                mask, last_pos = mask[idx], last_pos[idx]
            # Between two tokens: abort, or freeze (keep-mode pause) before the forward.
            if self._checkpoint(epoch):
                finish[active] = 3
                break
            logits_version = self.weight_version
            # Feed the sampled token: it is routed (and cached) now, sampled from next.
            mask = torch.cat(
                [mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=dev)], dim=1
            )
            last_pos = last_pos + 1
            logits, routes = self._forward(tok[:, None], mask, last_pos[:, None], cache, record)
            if routes is not None and routes_out is not None:
                routes_out[active, step] = routes[:, 0].to(routes_out.dtype)
        return collect_outputs(
            prompts,
            n,
            tokens_out,
            logp_out,
            top_ids_out,
            top_lp_out,
            out_len,
            finish,
            stop_reason,
            prompt_routes,
            routes_out,
            prompt_start,
            spans,
        )

    def _route_dtype(self) -> torch.dtype:
        return torch.uint8 if storage_dtype(max(self.num_experts, 1)) == np.uint8 else torch.int16

    def _sample(
        self,
        logits: torch.Tensor,
        keys: torch.Tensor,
        step: int,
        greedy: bool,
        temperature: float,
        top_p: float,
        top_k: int,
        num_logprobs: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Draw one token per row; returns (tokens [R], logprobs [R], top-k logprobs)."""
        return sample_tokens(
            logits, keys, step, greedy, temperature, top_p, top_k, num_logprobs,
            self.logprobs_mode,
        )
