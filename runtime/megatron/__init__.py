"""The Megatron-core trainer engine (first slice: model build, HF weight conversion, log-probs).

Import :mod:`runtime.megatron.model` for the model; :mod:`runtime.megatron.cpu` holds the
CPU-only patches that tests (and ``cluster.devices: cpu``) apply first.
"""
