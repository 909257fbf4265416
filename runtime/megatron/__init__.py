"""The Megatron-core trainer engine.

:mod:`runtime.megatron.parallel` sets up the process groups (and their collectives);
:mod:`runtime.megatron.model` builds the spec's GPTModel (every family of the spec; DeepSeek-V3
and GLM-4.5 in :mod:`runtime.megatron.deepseek` / :mod:`runtime.megatron.glm`);
:mod:`runtime.megatron.hf_weights` converts HF weights in and out (:mod:`runtime.megatron.hf_mlp`:
the MLPs), loads this rank's shard and gathers the full state dict;
:mod:`runtime.megatron.logprobs` computes per-token log-probs and entropies;
:mod:`runtime.megatron.engine` trains it (DDP, distributed optimizer, ``forward_backward_func``,
the losses of ``runtime.losses``; :mod:`runtime.megatron.microbatches` pads its micro-batches
to the shapes all ranks share);
:mod:`runtime.megatron.replay` runs R2 / R3 through megatron-core's ``RouterReplay``;
:mod:`runtime.megatron.attention` is the core attention (torch SDPA) and
:mod:`runtime.megatron.context_parallel` its context parallelism (sequence split, K/V gather);
:mod:`runtime.megatron.checkpoint` reads and writes Megatron-LM checkpoint roots;
:mod:`runtime.megatron.args` reads the Megatron-LM flags of ``train.sh``;
:mod:`runtime.megatron.cpu` holds the CPU-only patches that tests and CPU runs apply first.
"""

import re
import warnings

# megatron-core 0.16.1 and torch announce, once per rank and again at every checkpoint, what
# this engine uses knowingly: megatron's local norms and optimizers (no Apex or
# TransformerEngine), ShardedTensor-based dist_checkpointing and megatron's own calls of
# deprecated torch.distributed names. In a job log they bury the trainer's own lines.
for _message in (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`load_state_dict` is deprecated and will be removed",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    "The 'megatron.core.transformer.custom_layers.transformer_engine'",
):
    warnings.filterwarnings("ignore", message=re.escape(_message))
