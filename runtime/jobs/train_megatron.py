"""The RL job's trainer on ``train.backend: megatron``: one rank of the Megatron trainer
(``runtime.jobs.train``'s module doc says how the ranks share the loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.jobs.common import JobContext
from runtime.jobs.train import TrainerProcess

__all__ = ["MegatronTrainerProcess"]


class MegatronTrainerProcess(TrainerProcess):
    """``train.backend: megatron``: this rank of the Megatron trainer (module doc)."""

    shares_live_parameters = False  # it publishes a gathered copy of its shards

    def __init__(self, ctx: JobContext, args: Any) -> None:
        self.args = args
        super().__init__(ctx)

    def _setup(self) -> None:
        from runtime.megatron import checkpoint as ckpt
        from runtime.megatron.args import train_settings
        from runtime.megatron.engine import MegatronTrainer
        from runtime.megatron.setup import build_policy

        args = self.args
        if args.moe_enable_routing_replay != (self.replay_mode != "off"):
            raise ValueError(f"--moe-enable-routing-replay is {'set' if args.moe_enable_routing_replay else 'not set'} "
                             f"but router_replay.mode is {self.replay_mode}")
        policy = build_policy(args, self.ctx.spec["cluster"]["devices"], str(self.policy_path),
                              routing_replay=self.replay_mode != "off")
        self.main = policy.main
        self.hf_config, self.tokenizer = policy.hf_config, policy.tokenizer
        self.dtype = policy.dtype
        self.module: Any = policy.module
        if self.main:
            self.log.info("Megatron trainer: %s", policy.describe)
        read = ckpt.load_model(self.module, args.load)
        if self.main:
            self.log.info("weights from %s", read)
        reference = None
        if self.kl_on:  # the frozen starting policy, same layout, routing freely
            reference = policy.build_like()
            ckpt.load_model(reference, args.load)
            for chunk in reference:
                chunk.requires_grad_(False).eval()
        self.train_cfg = train_settings(args, self.train_cfg)
        self.trainer = MegatronTrainer(  # type: ignore[assignment]
            self.module, algorithm=self.algorithm, train=self.train_cfg,
            vocab_size=int(self.hf_config.vocab_size), replay_mode=self.replay_mode,
            reference=reference, total_optimizer_steps=self.total_optimizer_steps,
            length_balancing=self.length_balancing, sync_tolerance=self.sync_tolerance)
        self.model = self.module

    # ----------------------------------------------------------------- state
    def _checkpoints(self) -> list[tuple[int, Path]]:
        from runtime.megatron.checkpoint import saved_iterations

        return saved_iterations(self.args.save)

    def save_checkpoint(self, step: int) -> None:
        from runtime.megatron import checkpoint as ckpt

        with ckpt.shared_atomic_dir(ckpt.iteration_dir(self.args.save, step), step=step) as tmp:
            self.trainer.save_checkpoint(tmp)  # type: ignore[attr-defined]
        if self.main:
            ckpt.write_tracker(self.args.save, step)
            ckpt.prune(self.args.save, self.keep)
            self.log.info("checkpoint after step %d", step)

    def sync(self, step: int, optimizer_steps: int) -> None:
        """As :meth:`TrainerProcess.sync`: the exact checkpoint of ``step`` if there is one;
        else the published weights of ``step`` (``--load`` at 0) and the optimizer state of
        the newest checkpoint before it, or a fresh one."""
        from runtime.megatron import checkpoint as ckpt
        from runtime.megatron.hf_folder import load_hf_folder

        trainer: Any = self.trainer
        ckpts = [(s, p) for s, p in self._checkpoints() if s <= step]
        if ckpts and ckpts[-1][0] == step:
            trainer.load_checkpoint(ckpts[-1][1])
            how = f"checkpoint {ckpts[-1][1].name} (exact)"
        else:
            if ckpts:
                trainer.load_checkpoint(ckpts[-1][1])  # for its optimizer state
                how = f"optimizer state of checkpoint {ckpts[-1][1].name}"
            else:
                trainer.optimizer = trainer._build_optimizer()
                how = "fresh optimizer state"
            if step:  # each rank reads its own layers' tensors of the folder
                load_hf_folder(self.module, self.hf_config, self.paths.version(step))
                how = f"weights {self.paths.version(step)}, {how}"
            else:
                how = f"weights {ckpt.load_model(self.module, self.args.load)}, {how}"
            if hasattr(trainer.optimizer, "reload_model_params"):
                trainer.optimizer.reload_model_params()  # half-precision runs: fp32 main copy
        trainer.optimizer_steps = optimizer_steps
        self.version = step
        if self.main:
            self.log.info("synced to step %d from %s", step, how)

    # ----------------------------------------------------------------- batches
    def next_batch(self) -> dict[str, Any] | None:
        """Rank 0 finds the batch; every rank reads the same file (the run directory is
        shared), checked by its batch id."""
        import torch

        from runtime.megatron.checkpoint import broadcast

        payload = super().next_batch() if self.main else None
        found = broadcast(None if payload is None else (int(payload["step"]),
                                                        payload["batch_id"]))
        if found is None or self.main:
            return payload
        payload = torch.load(self.paths.batch(found[0]), weights_only=False)
        if payload["batch_id"] != found[1]:
            raise RuntimeError(f"{self.paths.batch(found[0])} changed while the ranks read it")
        return payload

    def publish(self, version: int, probe: dict[str, list[Any]] | None = None) -> None:
        """Write ``weights/v<version>``, each pipeline stage's layers from its own rank, one
        layer at a time (``runtime.megatron.hf_folder``; collective). With ``weight_sync``
        ipc or nccl, rank 0 then shares the version's tensors, read back from the folder: the
        whole model in one process, as those routes run on CPUs only so far
        (``runtime.capabilities``)."""
        from runtime.megatron.hf_folder import save_hf_folder

        folder = self.paths.version(version)
        save_hf_folder(self.module, self.hf_config, self.tokenizer, folder, step=version,
                       probe=probe)
        if self.main:
            if self.publisher is not None:
                from runtime.policy import load_policy

                self._share(version, load_policy(folder, dtype=self.dtype)[0])
            self._prune_weights(version)
