r"""The RL job's driver: prompts → rollouts → rewards → ZVE filters → advantages → trainer.

The driver, the trainer and the engines meet through the run directory's exchange files
(``runtime.exchange``). Step s: select prompts (pipeline) → generate n per prompt (group
sizes from the pipeline; ``runtime.generation``: seeded requests, balanced over the
replicas, rewards overlapped) → rewards (``build_reward``; decoded and scored by a pool of
``system.reward_workers`` processes made once per run when more than 1, ``runtime.scoring``)
→ ``pipeline.process`` (a step whose http-judge replies were unreadable more often than
``reward.judge.max_parse_failure_rate`` stops the run here) → group advantages (+ RL-ZVP
token advantages of reshaped groups, computed by the trainer, which has the old policy's
entropies) → TrainBatch tensors → ``batch-<s>.pt`` (handed over) → … → ``done-<s>.json`` →
load ``weights/v<s+1>`` into every engine
(``runtime.rollout.weight_transfer.driver_weight_transfer``) → one metrics line
(``runtime.run_log``) → state saved (``runtime.driver_state``). With colocated placement the
engines sleep from the hand-over to the load (``runtime.placement``).

Bounded staleness (``system.max_staleness`` k). The driver hands over step g's batch as
soon as the engines hold weights ``v<j>`` with g − j ≤ k, without waiting for the trainer:
with k = 0 each step samples from the weights of the step before it (synchronous,
on-policy); with k = 1 the engines generate step s+1 from ``v<s>`` while the trainer
trains step s, and so on. The weights of a finished step are loaded between two steps'
generation, never during one. Every batch records the version that sampled it
(``behaviour_version``; the engines report it on every completion, and a completion from
another version stops the run), the metrics line its ``staleness`` (s − version) and
``policy_version``, and the summary the rollouts generated at each staleness. The trainer's
correction (``algorithm.correction``) weighs each token by π_old / μ with μ the behaviour
policy's log-probs, and its weight-sync check runs on the steps sampled by the weights it
holds (staleness 0), since older weights differ by design.

End: after ``train.steps`` steps, or after the step whose rollouts bring the run's total
to ``train.rollout_budget`` (the batch of that step is marked ``last`` for the trainer).
With ``eval.every_steps`` = k, the engines' weights after every k-th step (and after the
last) are evaluated on the eval split (``eval.samples`` at ``eval.temperature``) and the
metrics line gets ``eval_accuracy``.

Batch size: every response of the batch's groups is sent to the trainer, which splits them
into about B / ``train.global_batch_size`` optimizer steps (``runtime.trainer``): adaptive
group sizes change B from step to step, and trimming to a fixed size would waste rollouts.

Resume (exact for the driver): the driver's state — finished steps, the steps handed over
and not yet trained, the engines' weights version, pipeline (stages, ledger), prompt stream
position and RNG, length predictor, run totals — is pickled atomically after every
hand-over and every finished step, together with the number of metrics lines; a restart
truncates ``metrics.jsonl`` to that count, drops the exchange files of steps not handed
over (batches) or not finished (done files), loads the engines' weights version and
continues: the batches handed over are trained (no prompt is lost or drawn twice), and the
next step is sampled as it would have been — every generation request carries a seed
derived from ``train.seed``, the step and the request's prompts (``runtime.seeds``), and the
step's prompts, the pipeline's RNG and the weights it samples from are those of the
interrupted session. The trainer restarts from ``weights/v<s>`` (exact weights) and the
newest checkpoint ≤ s for the optimizer state (exact when that checkpoint is at s, else
Adam's moments are those of the checkpoint's step); its learning-rate schedule position
comes from the driver (exact). With a checkpoint at every step
(``train.checkpoint.interval: 1``) a resumed run logs exactly the steps of an uninterrupted
one (time fields aside).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.driver_state import DriverState, Pending, load_state, save_state
from runtime.errors import JobError
from runtime.exchange import RunPaths, build_train_tensors, routing_shape, step_of, write_batch
from runtime.files import atomic_write_text
from runtime.processes import pid_alive
from runtime.sync_check import check_probe

__all__ = ["RLDriver", "TrainerFailed", "prompt_stream"]


def prompt_stream(spec: dict[str, Any], prompt_ids: Sequence[Any]) -> Any:
    """The order the run draws prompts in: a fresh shuffle every epoch, seeded with
    ``data.shuffle_seed`` (``train.seed`` seeds the filters and the trainer, not the order)."""
    from runtime.filters.pipeline import PromptStream

    return PromptStream(prompt_ids, seed=int((spec.get("data") or {}).get("shuffle_seed") or 0))


class TrainerFailed(JobError):
    """The trainer process stopped or reported a failure."""


class RLDriver:
    """One RL run's driver (module doc). ``log`` is a logger, ``ctx`` a JobContext."""

    def __init__(self, ctx: Any, *, client: Any = None, trainer_timeout_s: float | None = None,
                 startup_timeout_s: float | None = None) -> None:
        from runtime.files import read_jsonl
        from runtime.prompts import train_file

        self.ctx = ctx
        self.log = ctx.log
        self.spec = ctx.spec
        self.paths = RunPaths(ctx.run_dir)
        self.client = client
        env = os.environ
        self.trainer_timeout_s = float(trainer_timeout_s or env.get("RLSPEC_TRAINER_TIMEOUT", 300))
        self.startup_timeout_s = float(startup_timeout_s or ctx.startup_timeout_s)
        self.t_start = time.time()
        data = self.spec["data"]
        self.prompt_key = data["prompt_key"]
        self.eval_every = int(self.spec["eval"]["every_steps"])
        self._eval_rows: list[dict[str, Any]] | None = None
        self.answer_key = data["answer_key"]
        rows = list(read_jsonl(train_file(ctx)))
        # every prompt of the file; run() drops the overlong ones once it has the tokenizer
        self.rows = {row.get("id", i): row for i, row in enumerate(rows)}
        self.rollout = self.spec["rollout"]
        self.train = self.spec["train"]
        self.steps = int(self.train["steps"])
        self.budget: int | None = self.train["rollout_budget"]
        self.replay_mode = self.spec["router_replay"]["mode"]
        adv = self.spec["algorithm"]["advantage"]
        self.estimator = adv["estimator"]
        self.adv_eps = float(adv["eps"])
        self.alpha_zvp = float(adv["alpha_zvp"])
        self.max_staleness = int(self.spec["system"]["max_staleness"])
        self.reward_workers = int(self.spec["system"]["reward_workers"])
        self.scorer: Any = None  # the run's ScoringPool while run() runs (reward_workers > 1)
        from runtime.rollout.weight_transfer import driver_weight_transfer

        self.weight_transfer, note = driver_weight_transfer(
            self.spec, log=self.log.info, exchange=self.paths.exchange)
        if note:
            self.log.warning(note)
        from runtime.placement import Placement

        self.placement = Placement(self.spec, client, self.weight_transfer)

    # ----------------------------------------------------------------- setup
    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.ctx.input_of_kind("hf_checkpoint"))

    def _drop_overlong(self, tokenizer: Any) -> None:
        """Keep the train prompts that fit data.max_prompt_tokens (``runtime.prompts``)."""
        from runtime.prompts import drop_overlong

        self.rows = drop_overlong(self.rows, tokenizer, self.spec["data"], self.log, "train")

    def _eval_prompts(self, tokenizer: Any) -> list[dict[str, Any]]:
        """The eval split's rows that fit data.max_prompt_tokens (read once)."""
        from runtime.prompts import drop_overlong, eval_rows

        if self._eval_rows is None:
            self._eval_rows = list(drop_overlong(eval_rows(self.ctx), tokenizer,
                                                 self.spec["data"], self.log, "eval").values())
        return self._eval_rows

    def _model_shape(self) -> tuple[int | None, int | None, int | None]:
        return routing_shape(self.ctx.input_of_kind("hf_checkpoint"))

    def _new_state(self) -> DriverState:
        from runtime.filters import build_pipeline
        from runtime.prompts import screened_prompts
        from runtime.rewards import build_reward

        reward = build_reward(self.spec["reward"])
        seed = int(self.train["seed"])
        pipeline = build_pipeline(list(self.spec["filters"]),
                                  group_size=int(self.rollout["n"]),
                                  max_tokens=int(self.rollout["max_tokens"]), seed=seed,
                                  reward_range=reward.reward_range)
        prompt_ids = screened_prompts(self.ctx, pipeline, list(self.rows), self.log)
        stream = prompt_stream(self.spec, prompt_ids)
        return DriverState(pipeline=pipeline, stream=stream,
                           numpy_rng=np.random.default_rng(seed), lengths=self._predictor())

    def _predictor(self) -> Any:
        from runtime.rollout.length_predictor import LengthPredictor

        return LengthPredictor(int(self.rollout["max_tokens"]))

    def _resume(self) -> DriverState:
        state = load_state(self.paths.state)
        if state is None:
            for stale in (self.paths.exchange, self.paths.weights, self.paths.checkpoints):
                if stale.exists():
                    import shutil

                    # a trainer started meanwhile may be writing its sender's record there
                    shutil.rmtree(stale, ignore_errors=True)
            self.paths.metrics.unlink(missing_ok=True)
            return self._new_state()
        self.log.info("resuming after step %d (state %s)", state.step, self.paths.state)
        if state.lengths is None:  # a state saved before length balancing: no history yet
            state.lengths = self._predictor()
        lines = []
        if self.paths.metrics.is_file():
            lines = self.paths.metrics.read_text(encoding="utf-8").splitlines()
        atomic_write_text(self.paths.metrics,
                          "".join(line + "\n" for line in lines[: state.metrics_lines]))
        exchange = self.paths.exchange
        if exchange.is_dir():  # batches not handed over, done files of unfinished steps
            for p in exchange.glob("batch-*.pt"):
                if step_of(p) >= state.next_batch:
                    p.unlink(missing_ok=True)
            for p in exchange.glob("done-*.json"):
                if step_of(p) >= state.step:
                    p.unlink(missing_ok=True)
        for pending in state.pending:
            if not self.paths.batch(pending.step).is_file():
                raise JobError(f"{self.paths.batch(pending.step)} is gone: the state "
                               f"{self.paths.state} counts it as handed over to the trainer")
        if state.pending:
            self.log.info("steps %s were handed over and are trained first",
                          ", ".join(str(p.step) for p in state.pending))
        return state

    # ----------------------------------------------------------------- trainer link
    def _trainer_check(self, started: bool) -> None:
        err = self.paths.trainer_error
        if err.is_file():
            with contextlib.suppress(ValueError, OSError):
                info = json.loads(err.read_text(encoding="utf-8"))
                raise TrainerFailed(f"trainer failed: {info.get('error')} "
                                    f"(log: {self.ctx.run_dir / 'logs' / 'rl-train.log'})")
        hb = self.paths.heartbeat
        now = time.time()
        if not hb.is_file():
            if now - self.t_start > self.startup_timeout_s:
                raise TrainerFailed(f"no trainer heartbeat after {self.startup_timeout_s:.0f} s "
                                    f"(log: {self.ctx.run_dir / 'logs' / 'rl-train.log'})")
            return
        with contextlib.suppress(ValueError, OSError):
            beat = json.loads(hb.read_text(encoding="utf-8"))
            if beat.get("host") == socket.gethostname() and not pid_alive(int(beat["pid"])):
                raise TrainerFailed(f"the trainer process (pid {beat['pid']}) is gone "
                                    f"(log: {self.ctx.run_dir / 'logs' / 'rl-train.log'})")
            if started and now - float(beat["time"]) > self.trainer_timeout_s:
                raise TrainerFailed(f"no trainer heartbeat for {now - float(beat['time']):.0f} s "
                                    f"(log: {self.ctx.run_dir / 'logs' / 'rl-train.log'})")

    def _wait_done(self, step: int, batch_id: str) -> dict[str, Any]:
        path = self.paths.done(step)
        while True:
            if path.is_file():
                with contextlib.suppress(ValueError, OSError):
                    done = json.loads(path.read_text(encoding="utf-8"))
                    if done.get("batch_id") == batch_id:
                        return done
            self._trainer_check(started=True)
            time.sleep(0.05)

    # ----------------------------------------------------------------- generation
    def _generation(self) -> Any:
        from runtime.generation import Generation

        return Generation(self.spec, self.rows, self.client, self.scorer)

    def _rollouts(self, state: DriverState, step: int, tokenizer: Any, reward: Any,
                  stats: dict[str, Any]) -> tuple[Any, dict[str, int]]:
        """Step ``step``'s pipeline batch, sampled by the engines' weights ``v<state.version>``,
        and the judge's calls and parse failures over it (``RewardComposer.judge_step``: a
        JudgeError, before anything is trained on those rewards, when too many replies could
        not be parsed)."""
        generation = self._generation()
        before = reward.judge_counters()
        rounds = itertools.count()  # the sampling rounds of the step (DAPO refills)
        batch = state.pipeline.step(
            step, state.stream,
            lambda reqs: generation.groups(reqs, tokenizer, reward, stats, state.lengths, step,
                                           next(rounds), expect=state.version),
            int(self.rollout["prompts_per_step"]))
        return batch, reward.judge_step(before)

    def _evaluate(self, tokenizer: Any, reward: Any, context: Any, step: int = 0) -> float:
        """Held-out accuracy of the engines' current weights (``runtime.generation``)."""
        return self._generation().evaluate(self._eval_prompts(tokenizer), tokenizer, reward,
                                           context, step)

    def _over_budget(self, ledger: Any) -> bool:
        return self.budget is not None and ledger.generated >= self.budget

    def _all_handed_over(self, state: DriverState) -> bool:
        """All steps handed over, or the step that reached ``train.rollout_budget``."""
        return state.next_batch >= self.steps or self._over_budget(state.pipeline.ledger)

    # ----------------------------------------------------------------- one step
    def _batch(self, state: DriverState, batch: Any, shape: tuple[Any, Any, Any],
               pad_id: int) -> dict[str, Any]:
        """The exchange payload of a pipeline Batch (every response of its groups)."""
        import torch

        from runtime.advantages import group_advantages

        rewards, valid, sign = batch.padded()
        P, G = rewards.shape if rewards.size else (0, 0)
        adv = group_advantages(torch.as_tensor(rewards), eps=self.adv_eps,
                               valid=torch.as_tensor(valid)) if P else torch.zeros((0, 0))
        rows, seq_adv, flat_rows = [], [], []
        for p, g in enumerate(batch.groups):
            prompt, comps = g.payload
            for j, c in enumerate(comps):
                rows.append((prompt, list(c.token_ids), c.logprobs, c.routed_experts))
                seq_adv.append(float(adv[p, j]))
                flat_rows.append(p * G + j)
        experts, moe_layers, top_k = shape
        payload = build_train_tensors(rows, pad_id=pad_id, num_experts=experts,
                                      moe_layers=moe_layers, top_k=top_k)
        payload["advantages"] = torch.tensor(seq_adv, dtype=torch.float32)
        payload["zvp"] = None
        if self.estimator == "rl_zvp" and rows and bool((sign != 0).any()):
            payload["zvp"] = {"rewards": torch.as_tensor(rewards), "valid": torch.as_tensor(valid),
                              "flat_sign": torch.as_tensor(sign),
                              "rows": torch.tensor(flat_rows, dtype=torch.long),
                              "alpha_zvp": self.alpha_zvp, "eps": self.adv_eps}
        if self.replay_mode != "r3":
            payload["routing_ids"] = payload["routing_mask"] = None
        return payload

    def _hand_over(self, state: DriverState, tokenizer: Any, reward: Any,
                   shape: tuple[Any, Any, Any], pad_id: int) -> None:
        """Generate step ``state.next_batch`` from the engines' weights, write its batch for
        the trainer and keep the rollout half of its metrics line until it is trained."""
        step = state.next_batch
        stats: dict[str, Any] = {"tokens": 0, "seconds": 0.0,
                                 "replica_busy": [0.0] * len(self.client.endpoints)}
        pipeline = state.pipeline
        batch, judged = self._rollouts(state, step, tokenizer, reward, stats)
        all_groups = batch.groups + batch.removed
        raw = np.concatenate([g.raw_rewards for g in all_groups]) if all_groups else np.zeros(0)
        correct = (np.concatenate([pipeline.ctx.correctness(g) for g in all_groups])
                   if all_groups else np.zeros(0))
        last = step + 1 >= self.steps or self._over_budget(pipeline.ledger)
        payload = self._batch(state, batch, shape, pad_id)
        batch_id = uuid.uuid4().hex
        # the schedule position is known only when no earlier step is still being trained
        # (else the trainer reads it from done-<step-1>.json when it must resync)
        payload.update(step=step, batch_id=batch_id, behaviour_version=state.version,
                       optimizer_steps=None if state.pending else state.optimizer_steps,
                       last=last)
        self.placement.release()  # colocated: the engines sleep before the trainer steps
        write_batch(self.paths.batch(step), payload)
        led = batch.ledger
        staleness = step - state.version
        from runtime.run_log import replica_metrics

        line = {
            "step": step,
            "reward_mean": float(raw.mean()) if raw.size else None,
            "train_accuracy": float(correct.mean()) if correct.size else None,
            "zero_variance_rate": led.zero_variance_rate,
            "rollouts_generated": led.generated,
            "rollouts_used": led.used,
            "rollouts_reshaped": led.reshaped,
            "rollouts_kept_flat": led.kept_flat,
            "rollouts_dropped": led.dropped,
            "responses_trained": int(payload["input_ids"].shape[0]),
            "tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9),
            "policy_version": state.version,
            "staleness": staleness,
            **replica_metrics(stats),
            **judged,  # judge_calls, judge_parse_failures (http judge)
        }
        state.pending.append(Pending(step, batch_id, last, line))
        state.by_staleness[staleness] = state.by_staleness.get(staleness, 0) + led.generated
        state.next_batch = step + 1
        save_state(self.paths.state, state)

    def _check_probe(self, version: int) -> float | None:  # of the weights just loaded
        return check_probe(self.client, self.paths.version(version), version,
                           self.spec["system"]["weight_sync_tolerance"], warn=self.log.warning)

    def _finish(self, state: DriverState, tokenizer: Any, reward: Any, log: Any) -> None:
        """Wait for the oldest handed-over step to be trained, load its weights into the
        engines, evaluate when due, and log its metrics line."""
        pending = state.pending[0]
        step = pending.step
        done = self._wait_done(step, pending.batch_id)
        tm = done.get("metrics") or {}
        self.placement.load(str(step + 1), str(self.paths.version(step + 1)))
        probed = self._check_probe(step + 1)
        state.version = step + 1
        line = dict(pending.line)
        sleep_wake = self.placement.take_seconds()
        if sleep_wake is not None:
            line["sleep_wake_seconds"] = sleep_wake
        if self.eval_every and ((step + 1) % self.eval_every == 0 or pending.last):
            line["eval_accuracy"] = self._evaluate(tokenizer, reward, state.pipeline.ctx, step)
        now = time.monotonic()
        wall = now - self._last_finish  # the run's time per step, generation and training
        self._last_finish = now
        line.update({
            "reshaped_advantage_share": tm.get("reshaped_advantage_share"),
            "reshaped_grad_norm_share": tm.get("reshaped_grad_norm_share"),
            "entropy": tm.get("entropy"),
            "clip_fraction": {k.split("/", 1)[1]: v for k, v in tm.items()
                              if k.startswith("clip_frac/")},
            "clip_frac": tm.get("clip_frac"),
            "train_inference_gap": tm.get("train_inference_gap"),
            "kl": tm.get("kl"),
            "loss": tm.get("loss"),
            "grad_norm": tm.get("grad_norm"),
            "weight_sync_probe_gap": probed,
            "lr": tm.get("lr"),
            "wall_seconds": wall,
        })
        log.write(line)
        state.pending.pop(0)
        state.optimizer_steps = int(done.get("optimizer_steps", state.optimizer_steps))
        state.wall_seconds += wall
        state.metrics_lines += 1
        state.step = step + 1
        save_state(self.paths.state, state)
        self.paths.batch(step).unlink(missing_ok=True)  # after the state no longer needs it

    def run(self) -> dict[str, Any]:
        """Run (or resume) every step; returns the summary written to rl_metrics. With
        ``system.reward_workers`` > 1 the run's pool of reward workers lives as long as this
        call (``runtime.scoring``)."""
        if self.reward_workers < 2:
            return self._run()
        from runtime.scoring import ScoringPool

        with ScoringPool(self.reward_workers, str(self.ctx.input_of_kind("hf_checkpoint")),
                         self.spec["reward"]) as self.scorer:
            try:
                return self._run()
            finally:
                self.scorer = None

    def _run(self) -> dict[str, Any]:
        from runtime.rewards import build_reward
        from runtime.run_log import RunLog

        paths = self.paths
        tokenizer = self._tokenizer()
        self._drop_overlong(tokenizer)  # before the state: the prompt stream draws from these
        state = self._resume()
        paths.exchange.mkdir(parents=True, exist_ok=True)
        paths.trainer_error.unlink(missing_ok=True)  # stale: from an earlier session
        paths.heartbeat.unlink(missing_ok=True)
        shape = self._model_shape()
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        reward = build_reward(self.spec["reward"])
        self.client.wait_ready(timeout=self.startup_timeout_s,
                               model_root=str(self.ctx.input_of_kind("hf_checkpoint")))
        if self.scorer is not None:  # started with the engines, in parallel
            self.scorer.wait_ready(timeout=self.startup_timeout_s)
            self.log.info("%d reward workers (pids %s) decode and score the rollouts",
                          self.scorer.workers, ", ".join(map(str, self.scorer.pids)))
        if state.version > 0:  # the engines start from policy_sft: load the last weights
            self.weight_transfer.push(self.client, str(state.version),
                                      path=str(paths.version(state.version)))
            self._check_probe(state.version)
        if state.pending and self.placement.colocated:  # resumed: they are trained first
            self.log.info("colocated: the engines sleep while the handed-over steps train")
            self.placement.release()
        log = RunLog(paths.metrics, paths.root / "tensorboard", self.steps, state.step, self.log)
        self._last_finish = time.monotonic()
        while not self._all_handed_over(state):
            # bounded staleness: step g samples from v<j> with g - j <= max_staleness
            while state.next_batch - state.version > self.max_staleness:
                self._finish(state, tokenizer, reward, log)
            self._hand_over(state, tokenizer, reward, shape, pad_id)
        while state.pending:
            self._finish(state, tokenizer, reward, log)
        log.close()
        led = state.pipeline.ledger
        led.check()
        if state.step < self.steps:
            self.log.info("rollout budget %d reached after %d steps (%d rollouts)",
                          self.budget, state.step, led.generated)
        return {"rollouts_generated": led.generated,
                "rollouts_wasted": led.wasted,
                "rollouts_reshaped": led.reshaped,
                "rollouts_zero_variance": led.zero_variance,
                "rollouts_by_staleness": {str(k): v for k, v in sorted(state.by_staleness.items())},
                "wall_seconds": state.wall_seconds,
                "steps": state.step,
                "ledger": led.to_dict()}
