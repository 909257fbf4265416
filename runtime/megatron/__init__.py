"""The Megatron-core trainer engine.

:mod:`runtime.megatron.model` builds the spec's MoE GPTModel, converts HF weights in and out
and computes per-token log-probs; :mod:`runtime.megatron.engine` trains it (DDP, distributed
optimizer, ``forward_backward_func``, the losses of ``runtime.losses``);
:mod:`runtime.megatron.replay` runs R2 / R3 through megatron-core's ``RouterReplay``;
:mod:`runtime.megatron.cpu` holds the CPU-only patches that tests apply first.
"""
