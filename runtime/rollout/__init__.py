"""Rollout service: an embedded engine that serves the policy over vLLM's HTTP API
subset (``server``), the engine itself (``engine``), the shared wire protocol
(``protocol``) and the client the RL driver uses against it or ``vllm serve``
(``client``). Importing the package does not import torch; ``engine`` does."""

from runtime.rollout.protocol import (
    CompletionRequest,
    CompletionResponse,
    ProtocolError,
    WeightVersionSpan,
)

__all__ = ["CompletionRequest", "CompletionResponse", "ProtocolError", "WeightVersionSpan"]
