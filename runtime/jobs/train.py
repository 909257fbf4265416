"""The RL job's trainer: trains each batch the driver hands over (local or Megatron backend).

Started by ``jobs/rl/train.sh`` next to the driver (``runtime.jobs.rl``); the exchange files
are described in ``runtime.exchange``. Loop: wait for ``exchange/batch-<s>.pt`` → (RL-ZVP token
advantages of reshaped groups from the old policy's entropies) → ``Trainer.step`` → weights
``weights/v<s+1>`` (HF folder, atomic; with ``system.weight_sync: ipc`` its tensors are also
shared with this node's engines, ``IPCWeightTransfer.publish``, with ``nccl`` held for the
driver to have them broadcast, ``runtime.rollout.broadcast_transfer``; either while an engine
may load them) → a checkpoint every ``train.checkpoint.interval`` steps and after the last
(``checkpoints/rl/step-<k>``: model, optimizer, step; the newest ``checkpoint.keep`` kept) →
``done-<s>.json`` with the metrics. A batch whose step is not the trainer's current version (a
restarted run) re-syncs first: weights from ``weights/v<s>``, optimizer state from the newest
checkpoint ≤ s. After the last step the process writes ``trainer-finished.json`` and waits to
be stopped by the launch script (it must not end before the driver does). A heartbeat file
lets the driver notice a dead trainer; a failure is written to ``trainer-error.json`` and ends
the process with status 1.

``train.backend: megatron`` (``runtime.jobs.train_megatron``): one process per GPU, started
by torchrun (``runtime.launch``, ``file://`` rendezvous, on CPUs) with ``train.sh``'s
Megatron-LM flags (``runtime.megatron.args``), from ``--load``; rank 0 alone reads and writes
the exchange files and broadcasts which batch to take; each step's weights are written by every
pipeline stage, a layer at a time, and read back on resume by each rank for its own layers
(``runtime.megatron.hf_folder``). Checkpoints: Megatron-LM iterations under
``--save`` (``iter_<step>``, optimizer shards included; ``runtime.megatron.checkpoint``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.jobs.common import JobContext, atomic_dir, atomic_write_json
from runtime.trainer import schedule_length


class _Stop(BaseException):  # SIGTERM
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise _Stop()


class TrainerProcess:
    """The local backend's trainer (one process), and the loop every backend shares."""

    shares_live_parameters = True  # publish() shares the parameters the next step updates

    def __init__(self, ctx: JobContext) -> None:
        import torch

        from runtime.exchange import RunPaths

        self.ctx = ctx
        self.log = ctx.log
        self.paths = RunPaths(ctx.run_dir)
        spec = ctx.spec
        self.train_cfg = spec["train"]
        self.algorithm = spec["algorithm"]
        self.steps = int(self.train_cfg["steps"])
        typed = ctx.model_spec
        self.interval = typed.train.checkpoint.interval
        self.keep = typed.train.checkpoint.keep
        self.seed = typed.train.seed
        self.epochs = typed.algorithm.ppo_epochs
        self.replay_mode = typed.router_replay.mode
        self.total_optimizer_steps = schedule_length(spec, ctx.derived)
        self.length_balancing = typed.system.length_balancing
        self.sync_tolerance = typed.system.weight_sync_tolerance
        self.max_staleness = typed.system.max_staleness
        self.weight_sync, self.engine = typed.system.weight_sync, typed.rollout.engine
        self.publisher: Any = None  # weight_sync ipc / nccl: the main process's
        self.policy_path = ctx.input_of_kind("hf_checkpoint")
        self.kl_on = typed.algorithm.kl.coefficient > 0
        self.main = True  # this process reads and writes the exchange files
        torch.manual_seed(self.seed)
        self.version = 0
        self._beat = True
        self._trained: dict[str, tuple[int, int, int]] = {}  # batch files found trained: stat
        self._setup()
        if self.main:
            from runtime.rollout.publishers import trainer_publisher

            self.publisher = trainer_publisher(
                self.weight_sync, self.paths.exchange, self.paths.owner, self.policy_path,
                self.max_staleness, local=typed.cluster.scheduler == "local",
                live=self.shares_live_parameters)

    def _setup(self) -> None:
        from runtime.policy import load_policy
        from runtime.router_replay import patch_moe_routers
        from runtime.trainer import Trainer

        self.model, self.tokenizer = load_policy(self.policy_path)
        mode = self.replay_mode
        replay = patch_moe_routers(self.model) if mode != "off" else None
        reference = None
        if self.kl_on:  # the frozen policy RL starts from
            reference = load_policy(self.policy_path)[0].requires_grad_(False)
        self.trainer = Trainer(
            self.model, algorithm=self.algorithm, train=self.train_cfg,
            vocab_size=int(self.model.config.vocab_size), replay_mode=mode, replay=replay,
            reference=reference, total_optimizer_steps=self.total_optimizer_steps,
            length_balancing=self.length_balancing, sync_tolerance=self.sync_tolerance)

    def heartbeat(self) -> None:
        while self._beat:
            with contextlib.suppress(OSError):
                if self.paths.exchange.is_dir():
                    atomic_write_json(self.paths.heartbeat, {
                        "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                        "version": self.version})
            time.sleep(2.0)

    # ----------------------------------------------------------------- state
    def _checkpoints(self) -> list[tuple[int, Path]]:
        from runtime.jobs.common import is_complete

        root = self.paths.checkpoints
        found = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*")
                 if p.name.split("-")[1].isdigit() and is_complete(p)] if root.is_dir() else []
        return sorted(found)

    def save_checkpoint(self, step: int) -> None:
        import torch

        with atomic_dir(self.paths.checkpoints / f"step-{step}", step=step) as tmp:
            torch.save({"model": self.model.state_dict(),
                        "optimizer": self.trainer.optimizer.state_dict(),
                        "optimizer_steps": self.trainer.optimizer_steps, "step": step},
                       tmp / "state.pt")
        for _, old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.log.info("checkpoint after step %d", step)

    def sync(self, step: int, optimizer_steps: int) -> None:
        """Model = weights/v<step> (policy_sft at 0); optimizer from the newest checkpoint ≤ step."""
        import torch

        from runtime.policy import load_policy

        ckpts = [(s, p) for s, p in self._checkpoints() if s <= step]
        if ckpts and ckpts[-1][0] == step:
            state = torch.load(ckpts[-1][1] / "state.pt", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.trainer.optimizer.load_state_dict(state["optimizer"])
            how = f"checkpoint step-{step} (exact)"
        else:
            src = self.paths.version(step) if step else self.policy_path
            fresh, _ = load_policy(src)
            self.model.load_state_dict(fresh.state_dict())
            how = f"weights {src}"
            if ckpts:
                state = torch.load(ckpts[-1][1] / "state.pt", weights_only=False)
                self.trainer.optimizer.load_state_dict(state["optimizer"])
                how += f", optimizer state of checkpoint step-{ckpts[-1][0]}"
            else:
                self.trainer.optimizer.state.clear()
                how += ", fresh optimizer state"
        self.trainer.optimizer_steps = optimizer_steps
        self.version = step
        self.log.info("synced to step %d from %s", step, how)

    # ----------------------------------------------------------------- batches
    def next_batch(self) -> dict[str, Any] | None:
        import json

        import torch

        from runtime.exchange import step_of

        for path in sorted(self.paths.exchange.glob("batch-*.pt"), key=step_of):
            done = self.paths.done(step_of(path))
            try:
                stat = path.stat()
                file = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                # Not read again while its done file stands: with R3's routing a batch can be
                # GBs, and the driver removes it only after it has loaded the new weights.
                if self._trained.get(path.name) == file and done.is_file():
                    continue
                payload = torch.load(path, weights_only=False)
            except (OSError, RuntimeError, EOFError):
                continue  # removed or replaced meanwhile
            if done.is_file():
                with contextlib.suppress(ValueError, OSError):
                    if json.loads(done.read_text())["batch_id"] == payload["batch_id"]:
                        self._trained[path.name] = file
                        continue
            return payload
        return None

    def _schedule_position(self, step: int, payload: dict[str, Any]) -> int:
        """The optimizer steps taken before ``step``: the batch's, else (handed over while
        earlier steps were training, ``runtime.exchange``) the count ``done-<step-1>.json``
        recorded."""
        import json

        if payload.get("optimizer_steps") is not None:
            return int(payload["optimizer_steps"])
        if step == 0:
            return 0
        return int(json.loads(self.paths.done(step - 1).read_text())["optimizer_steps"])

    def probe(self, batch: Any) -> dict[str, list[Any]] | None:
        """The weight-sync probe of the version this step made (``runtime.sync_check``): its
        tokens and the trainer's log-probs of them under the new weights (collective)."""
        import torch

        from runtime.sync_check import probe_sequence

        ids = probe_sequence(batch.input_ids, batch.attention_mask) if batch.size else None
        if ids is None:  # the same on every rank: they all read one batch
            return None
        row = torch.tensor([ids])
        logp = self.trainer.logprobs(row, torch.ones_like(row))
        return {"token_ids": ids, "logprobs": [float(x) for x in logp[0, 1:]]}

    def publish(self, version: int, probe: dict[str, list[Any]] | None = None) -> None:
        """Write ``weights/v<version>`` (HF, atomic; its completion marker holds ``probe``),
        share it (ipc), and drop the versions no engine can still be asked to load."""
        from runtime.policy import save_policy

        self.model.eval()
        save_policy(self.model, self.tokenizer, self.paths.version(version), step=version,
                    probe=probe)
        self._share(version, self.model)
        self._prune_weights(version)

    def _share(self, version: int, model: Any) -> None:
        """``weight_sync: ipc`` / ``nccl``: share (hold) the version's tensors for the engines
        (vLLM loads checkpoint names; the embedded engine takes its own module names as they
        are)."""
        if self.publisher is None:  # weight_sync disk
            return
        from runtime.policy import checkpoint_tensors

        named = checkpoint_tensors(model) if self.engine == "vllm" else model.state_dict()
        self.publisher.publish(version, self.paths.version(version), named.items())

    def _prune_weights(self, version: int) -> None:
        oldest = version - 1 - self.max_staleness  # the oldest version an engine may still load
        for old in self.paths.weights.glob("v*"):
            if old.name[1:].isdigit() and int(old.name[1:]) < oldest:
                shutil.rmtree(old, ignore_errors=True)
        if self.publisher is not None:
            self.publisher.prune(oldest)

    def train_batch(self, payload: dict[str, Any]) -> dict[str, Any]:
        import torch

        from runtime.advantages import advantage_mass_share, rl_zvp_token_advantages
        from runtime.router_replay import RoutingTrace
        from runtime.trainer import TrainBatch

        step = int(payload["step"])
        if step != self.version:
            self.sync(step, self._schedule_position(step, payload))
        routing = None
        if payload.get("routing_ids") is not None:
            routing = RoutingTrace(payload["routing_ids"], int(payload["num_experts"]),
                                   payload["routing_mask"])
        batch = TrainBatch(payload["input_ids"], payload["attention_mask"], payload["loss_mask"],
                           payload["rollout_logp"], payload["advantages"], routing)
        metrics: dict[str, Any] = {}
        probe = None
        if batch.size:
            zvp = payload.get("zvp")
            share: list[float] = []
            reshaped_rows = None  # bool [B]: the batch's rows from RL-ZVP's (flat) groups
            if zvp:
                G = zvp["rewards"].shape[1]
                reshaped_rows = zvp["flat_sign"].reshape(-1)[zvp["rows"] // G] != 0

            def zvp_advantages(entropy: torch.Tensor) -> torch.Tensor:
                """RL-ZVP token advantages of the batch's rows (they need the old policy's
                entropies, which the trainer's old-policy pass provides)."""
                P, G = zvp["rewards"].shape
                T = entropy.shape[1]
                H = torch.zeros((P * G, T))
                M = torch.zeros((P * G, T), dtype=torch.bool)
                H[zvp["rows"]] = entropy
                M[zvp["rows"]] = batch.loss_mask
                adv = rl_zvp_token_advantages(
                    zvp["rewards"], H, M, alpha_zvp=zvp["alpha_zvp"], eps=zvp["eps"],
                    valid=zvp["valid"], flat_sign=zvp["flat_sign"])
                out = adv[zvp["rows"]].float()
                share.append(advantage_mass_share(out, batch.loss_mask[:, :T], reshaped_rows))
                return out

            metrics = self.trainer.step(batch, epochs=self.epochs, seed=self.seed + step,
                                        advantages_from_entropy=zvp_advantages if zvp else None,
                                        version=step,
                                        behaviour_version=payload.get("behaviour_version"),
                                        reshaped_rows=reshaped_rows)
            # Σ|A| share of the RL-ZVP groups' tokens (runtime.advantages); 0 without them
            metrics["reshaped_advantage_share"] = share[0] if share else 0.0
            # ‖g_R‖ / ‖g‖ (runtime.trainer); None where the trainer does not split it
            metrics.setdefault("reshaped_grad_norm_share", None if zvp else 0.0)
            probe = self.probe(batch)
        self.publish(step + 1, probe)
        last = step + 1 >= self.steps or bool(payload.get("last"))
        if (self.interval and (step + 1) % self.interval == 0) or last:
            self.save_checkpoint(step + 1)
        self.version = step + 1
        return metrics

    def loop(self) -> None:
        if self.main:
            threading.Thread(target=self.heartbeat, daemon=True).start()
        while True:
            payload = self.next_batch()
            if payload is None:
                time.sleep(0.05)
                continue
            step = int(payload["step"])
            t0 = time.monotonic()
            metrics = self.train_batch(payload)
            if not self.main:
                if step + 1 >= self.steps or payload.get("last"):
                    return
                continue
            atomic_write_json(self.paths.done(step), {
                "batch_id": payload["batch_id"], "step": step, "metrics": metrics,
                "optimizer_steps": self.trainer.optimizer_steps,
                "seconds": time.monotonic() - t0})
            self.log.info("step %d/%d trained (%d responses, %.1f s)", step + 1, self.steps,
                          int(payload["input_ids"].shape[0]), time.monotonic() - t0)
            if step + 1 >= self.steps or payload.get("last"):  # all steps, or the budget
                self._beat = False
                atomic_write_json(self.paths.trainer_finished, {"steps": step + 1})
                return


def _idle() -> None:
    """Wait for the launch script's SIGTERM (``_Stop``): never end before the driver."""
    threading.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.exchange import RunPaths
    from runtime.processes import die_with_parent

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--config", required=True)
    args, megatron_flags = ap.parse_known_args(argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, _on_term)
    ctx = JobContext.load(args.config, log_to_file=False)
    proc: TrainerProcess | None = None
    try:
        if ctx.outputs_complete():
            ctx.log.info("trainer: outputs exist, nothing to train")
            _idle()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if ctx.model_spec.train.backend == "megatron":
            from runtime.jobs.train_megatron import MegatronTrainerProcess
            from runtime.megatron.args import parse_megatron_args

            proc = MegatronTrainerProcess(ctx, parse_megatron_args(argv))
        elif megatron_flags:
            raise ValueError(f"the local trainer takes only --config, not {megatron_flags}")
        else:
            proc = TrainerProcess(ctx)
        if proc.main:
            ctx.log.info("trainer ready (%d steps)", proc.steps)
        proc.loop()
        _idle()
    except (_Stop, KeyboardInterrupt):
        return 143
    except Exception as exc:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        traceback.print_exc()
        with contextlib.suppress(OSError):
            atomic_write_json(RunPaths(ctx.run_dir).trainer_error,
                              {"error": message, "pid": os.getpid()})
        print(f"rlspec trainer failed: {message}", file=sys.stderr)
        return 1
    finally:
        if proc is not None and proc.publisher is not None:  # ipc: its segments (after a
            # SIGKILL: the next trainer's job)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a 2nd SIGTERM (parent's death) too
            proc.publisher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
