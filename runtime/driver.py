r"""The RL job's driver: prompts → rollouts → rewards → ZVE filters → advantages → trainer.

Three processes make an RL run (``jobs/rl/launch.sh``): the rollout engine(s)
(``runtime.jobs.rollout_server`` or ``vllm serve``), the trainer (``runtime.jobs.train``)
and this driver (``runtime.jobs.rl``). They share the run directory::

    artifacts/rl/exchange/batch-<s>.pt     driver → trainer: step s's TrainBatch (atomic)
    artifacts/rl/exchange/done-<s>.json    trainer → driver: metrics of step s (atomic)
    artifacts/rl/exchange/trainer-heartbeat.json   trainer liveness (pid, host, time)
    artifacts/rl/exchange/trainer-error.json       the trainer's failure, one line
    artifacts/rl/weights/v<s+1>/           the policy after step s (HF folder, atomic)
    artifacts/rl/state/driver.pkl          driver state after the last complete step
    artifacts/rl/metrics.jsonl             one line per complete step
    checkpoints/rl/step-<k>/               trainer checkpoints (model, optimizer, step)

Step s (driver): select prompts (pipeline) → generate n per prompt (group sizes from the
pipeline) → rewards (``build_reward``; with ``system.reward_overlap`` each chunk of
prompts is scored as soon as its completions arrive while the others still generate) →
``pipeline.process`` (a step whose http-judge replies were unreadable more often than
``reward.judge.max_parse_failure_rate`` stops the run here) → group advantages (+ RL-ZVP token advantages of reshaped groups,
computed by the trainer, which has the old policy's entropies) → TrainBatch tensors →
``batch-<s>.pt`` → wait for ``done-<s>.json`` → load ``weights/v<s+1>`` into every engine
(``runtime.rollout.weight_transfer.driver_weight_transfer``) → one metrics line → state saved.

End: after ``train.steps`` steps, or after the step whose rollouts bring the run's total
to ``train.rollout_budget`` (the batch of that step is marked ``last`` for the trainer).
With ``eval.every_steps`` = k, the engines' weights after every k-th step (and after the
last) are evaluated on the eval split (``eval.samples`` at ``eval.temperature``) and the
metrics line gets ``eval_accuracy``.

Rollout replicas: the step's prompt groups go to the engine replicas (the client's
endpoints) by predicted work when ``system.length_balancing`` is true: each group's work is
n × its prompt's predicted generation length (``runtime.rollout.length_predictor``: the
mean length of the prompt's last group in this run, else the mean over all completions so
far, else ``rollout.max_tokens`` / 2) + its prompt's length, and the groups are assigned
longest first to the least-loaded replica (``runtime.rollout.balance``); each replica then
gets its groups as one request per group size (two with ``reward_overlap``). Off: the
client spreads every request's prompts round-robin. Either way the client reports every
request's start and finish, and the metrics line has each replica's busy time
(``replica_busy_seconds``: the union of its requests' spans) and idle fraction
(``replica_idle_fraction``: 1 − busy / ``generation_seconds``, the wall time of the step's
generation, scoring included; ``runtime.rollout.replica_time``).

Batch size: every response of the batch's groups is sent to the trainer, which splits them
into about B / ``train.global_batch_size`` optimizer steps (``runtime.trainer``): adaptive
group sizes change B from step to step, and trimming to a fixed size would waste rollouts.

Resume (exact for the driver): the driver's state — step, pipeline (stages, ledger), prompt
stream position and RNG, length predictor, run totals — is pickled atomically after every
step together with the number of metrics lines; a restart truncates ``metrics.jsonl`` to that count, drops
exchange files of later steps and continues with the next step, after loading the last
weights into the engines. The interrupted step re-samples the same rollouts: every
generation request carries a seed derived from ``train.seed``, the step and the request's
prompts (``runtime.seeds``), and the step's prompts, the pipeline's RNG and the weights
``v<s>`` it samples from are those of the interrupted session. The trainer restarts from
``weights/v<s>`` (exact weights) and the newest checkpoint ≤ s for the optimizer state
(exact when that checkpoint is at s, else Adam's moments are those of the checkpoint's
step); its learning-rate schedule position comes from the driver (exact). With a checkpoint
at every step (``train.checkpoint.interval: 1``) a resumed run logs exactly the steps of an
uninterrupted one (time fields aside).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import JobError
from runtime.files import atomic_write_json, atomic_write_text

__all__ = [
    "RLDriver",
    "RunPaths",
    "die_with_parent",
    "prompt_stream",
    "rollout_endpoints",
]

HEARTBEAT_S = 2.0


# --------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphans when a launch
    script is killed); elsewhere a watchdog thread polls the parent pid."""
    parent = os.getppid()
    if parent == 1:  # already orphaned (the launch script stopped while this one started)
        os.kill(os.getpid(), signal.SIGTERM)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent or parent == 1:  # the parent died before prctl
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def rollout_endpoints(env: dict[str, str] | None = None) -> list[str]:
    """``RLSPEC_ROLLOUT_ENDPOINTS``: the comma-separated engine URLs ``jobs/rl/launch.sh`` exports."""
    env = dict(os.environ if env is None else env)
    raw = [e.strip() for e in env.get("RLSPEC_ROLLOUT_ENDPOINTS", "").split(",") if e.strip()]
    if not raw:
        raise JobError("RLSPEC_ROLLOUT_ENDPOINTS is not set: run the RL job through its launch.sh")
    return raw


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class RunPaths:
    """Where the three RL processes meet (module doc)."""

    run_dir: Path

    @property
    def root(self) -> Path:
        return self.run_dir / "artifacts" / "rl"

    @property
    def exchange(self) -> Path:
        return self.root / "exchange"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def state(self) -> Path:
        return self.root / "state" / "driver.pkl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / "rl"

    def batch(self, step: int) -> Path:
        return self.exchange / f"batch-{step}.pt"

    def done(self, step: int) -> Path:
        return self.exchange / f"done-{step}.json"

    def version(self, v: int) -> Path:
        return self.weights / f"v{v}"

    @property
    def heartbeat(self) -> Path:
        return self.exchange / "trainer-heartbeat.json"

    @property
    def trainer_error(self) -> Path:
        return self.exchange / "trainer-error.json"

    @property
    def trainer_finished(self) -> Path:
        return self.exchange / "trainer-finished.json"


def step_of(path: Path) -> int:
    """The step number of ``batch-<s>.pt`` / ``done-<s>.json`` / ``v<s>``."""
    stem = path.name.split(".")[0]
    return int(stem.rsplit("-", 1)[-1].lstrip("v"))


# --------------------------------------------------------------------------- state


@dataclass
class DriverState:
    """Everything the driver needs to continue after the last complete step."""

    step: int = 0  # next step to run
    pipeline: Any = None
    stream: Any = None
    metrics_lines: int = 0
    optimizer_steps: int = 0
    wall_seconds: float = 0.0
    numpy_rng: Any = None
    lengths: Any = None  # LengthPredictor: per-prompt generation lengths, for balancing
    extra: dict[str, Any] = field(default_factory=dict)


def save_state(path: Path, state: DriverState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        pickle.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> DriverState | None:
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)


# --------------------------------------------------------------------------- batch


def build_train_tensors(
    rows: Sequence[tuple[list[int], list[int], np.ndarray, np.ndarray | None]],
    *,
    pad_id: int,
    num_experts: int | None,
    moe_layers: int | None,
    top_k: int | None,
) -> dict[str, Any]:
    """TrainBatch tensors of responses given as (prompt ids, response ids, engine logprobs,
    routed experts or None): prompt + response right-padded, loss mask on the response,
    the engine's logprobs at the response positions, R3 routing aligned and stacked."""
    import torch

    from runtime.router_replay import RoutingTrace, align_routing

    B = len(rows)
    T = max((len(p) + len(r) for p, r, _, _ in rows), default=1)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.bool)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    rollout_logp = torch.zeros((B, T), dtype=torch.float32)
    traces = []
    for b, (prompt, response, logp, routed) in enumerate(rows):
        P, R = len(prompt), len(response)
        ids[b, : P + R] = torch.tensor(prompt + response, dtype=torch.long)
        attention[b, : P + R] = True
        loss_mask[b, P : P + R] = True
        rollout_logp[b, P : P + R] = torch.as_tensor(np.asarray(logp, dtype=np.float32)[:R])
        if routed is not None and num_experts:
            traces.append(align_routing(routed, prompt_len=P, response_len=R,
                                        num_experts=num_experts, moe_layers=moe_layers,
                                        top_k=top_k))
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": attention,
                           "loss_mask": loss_mask, "rollout_logp": rollout_logp,
                           "routing_ids": None, "routing_mask": None, "num_experts": num_experts}
    if traces and len(traces) == B:
        stacked = RoutingTrace.stack(traces, length=T)
        out["routing_ids"], out["routing_mask"] = stacked.ids, stacked.mask
    return out


# --------------------------------------------------------------------------- driver


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
        self.startup_timeout_s = float(startup_timeout_s or env.get("RLSPEC_STARTUP_TIMEOUT", 900))
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
        self.overlap = bool(self.spec["system"]["reward_overlap"])
        self.balance = bool(self.spec["system"]["length_balancing"])
        from runtime.rollout.weight_transfer import driver_weight_transfer

        self.weight_transfer, note = driver_weight_transfer(self.spec)
        if note:
            self.log.warning(note)

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
        from runtime.files import read_jsonl
        from runtime.prompts import drop_overlong, eval_file

        if self._eval_rows is None:
            rows = dict(enumerate(read_jsonl(eval_file(self.ctx))))
            self._eval_rows = list(drop_overlong(rows, tokenizer, self.spec["data"], self.log,
                                                 "eval").values())
        return self._eval_rows

    def _model_shape(self) -> tuple[int | None, int | None, int | None]:
        cfg = json.loads((self.ctx.input_of_kind("hf_checkpoint") / "config.json").read_text())
        experts = (cfg.get("num_experts") or cfg.get("num_local_experts")
                   or cfg.get("n_routed_experts"))  # Qwen3-MoE, DeepSeek-V3
        top_k = cfg.get("num_experts_per_tok")
        layers = cfg.get("num_hidden_layers")
        dense = len(cfg.get("mlp_only_layers") or []) + int(cfg.get("first_k_dense_replace") or 0)
        moe_layers = None if layers is None else layers - dense
        return experts, moe_layers, top_k

    def _new_state(self) -> DriverState:
        from runtime.filters import build_pipeline
        from runtime.filters.offline_pass_rate import ScreenResult
        from runtime.rewards import build_reward

        reward = build_reward(self.spec["reward"])
        seed = int(self.train["seed"])
        pipeline = build_pipeline(list(self.spec["filters"]),
                                  group_size=int(self.rollout["n"]),
                                  max_tokens=int(self.rollout["max_tokens"]), seed=seed,
                                  reward_range=reward.reward_range)
        prompt_ids = list(self.rows)
        screen_path = None
        if "pass_rates" in self.ctx.inputs:
            ref = self.ctx.input_path("pass_rates", check=False)
            if (ref / ".complete").is_file():
                found = sorted(ref.glob("*.jsonl"))
                screen_path = found[0] if found else None
            else:
                self.log.warning("input pass_rates (%s) is missing or incomplete: RL runs "
                                 "without the offline screen", ref)
        if screen_path is not None:
            result = ScreenResult.read_jsonl(screen_path)
            survivors = pipeline.load_screen(result)
            known = set(self.rows)
            prompt_ids = [p for p in survivors if p in known] or prompt_ids
            self.log.info("screen %s: %d of %d prompts survive", screen_path, len(prompt_ids),
                          len(result.prompt_ids))
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

                    shutil.rmtree(stale)
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
        if self.paths.exchange.is_dir():
            for p in list(self.paths.exchange.glob("batch-*.pt")) + list(
                    self.paths.exchange.glob("done-*.json")):
                if step_of(p) >= state.step:
                    p.unlink(missing_ok=True)
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
            if beat.get("host") == socket.gethostname() and not _alive(int(beat["pid"])):
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
    def _chunks(self, requests: list[Any], encoded: dict[Any, list[int]],
                lengths: Any) -> list[tuple[int | None, list[int]]]:
        """The requests (indices) of each ``client.generate`` call, with the replica it goes
        to (None: the client's round-robin): of equal n, several per replica when rewards
        overlap generation; by predicted work with ``system.length_balancing`` (module doc)."""
        from runtime.rollout.balance import lpt_assign

        replicas = len(self.client.endpoints)
        if self.balance:
            work = [r.n * lengths.predict(r.prompt_id) + len(encoded[r.prompt_id])
                    for r in requests]
            owner = lpt_assign(work, replicas)
            parts = 2 if self.overlap else 1
            keys = [(owner[i], r.n) for i, r in enumerate(requests)]
        else:
            parts = max(1, 2 * replicas) if self.overlap else 1
            keys = [(None, r.n) for r in requests]
        by_key: dict[tuple[int | None, int], list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        chunks: list[tuple[int | None, list[int]]] = []
        for (replica, _), idx in by_key.items():
            size = max(1, math.ceil(len(idx) / parts))
            chunks += [(replica, idx[k : k + size]) for k in range(0, len(idx), size)]
        return chunks

    def _generate(self, requests: list[Any], tokenizer: Any, reward: Any,
                  stats: dict[str, Any], lengths: Any, step: int = 0,
                  round_: int = 0) -> list[Any]:
        """One group per request: sampled, decoded and scored; each group's lengths go to the
        predictor, each replica's busy time and the generation's wall time to ``stats``. Each
        chunk of prompts is one seeded request (``runtime.seeds``: ``train.seed``, step,
        sampling round of the step, the chunk's prompt ids and n)."""
        from runtime.filters import Group
        from runtime.rollout.replica_time import RequestLog
        from runtime.seeds import request_seed

        sampling = dict(self.rollout["sampling"])
        sampling["max_tokens"] = int(self.rollout["max_tokens"])
        run_seed = int(self.train["seed"])
        want_routes = self.replay_mode == "r3"
        encoded = {}
        for r in requests:
            if r.prompt_id not in encoded:
                text = str(self.rows[r.prompt_id][self.prompt_key])
                encoded[r.prompt_id] = tokenizer.encode(text, add_special_tokens=False)
        chunks = self._chunks(requests, encoded, lengths)
        log = RequestLog()
        groups: list[Any] = [None] * len(requests)

        def score(chunk: list[int], completions: list[list[Any]]) -> None:
            for i, comps in zip(chunk, completions, strict=True):
                req = requests[i]
                row = self.rows[req.prompt_id]
                texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
                got = reward.group_rewards(str(row[self.prompt_key]), texts,
                                           str(row.get(self.answer_key, "")))
                sizes = [len(c.token_ids) for c in comps]
                stats["tokens"] += sum(sizes)
                lengths.observe(req.prompt_id, sizes)
                groups[i] = Group(req.prompt_id, got.rewards, lengths=sizes,
                                  token_ids=[c.token_ids for c in comps], scores=got.scores,
                                  payload=(encoded[req.prompt_id], comps))

        def gen(replica: int | None, chunk: list[int]) -> list[list[Any]]:
            prompts = [encoded[requests[i].prompt_id] for i in chunk]
            n = requests[chunk[0]].n
            key = (round_, tuple(requests[i].prompt_id for i in chunk), n)
            seeded = {**sampling, "seed": request_seed(run_seed, "rollout", step, key)}
            return self.client.generate(prompts, n=n, sampling=seeded,
                                        return_routed_experts=want_routes, endpoint=replica,
                                        on_request=log)

        t0 = time.monotonic()
        if len(chunks) == 1:
            score(chunks[0][1], gen(*chunks[0]))
        else:
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                futures = {pool.submit(gen, *c): c[1] for c in chunks}
                if self.overlap:  # each chunk scored as it returns, while others generate
                    arrivals: Any = as_completed(futures)
                else:  # scored once every chunk has returned
                    wait(futures)
                    arrivals = futures
                for fut in arrivals:
                    score(futures[fut], fut.result())
        stats["seconds"] += time.monotonic() - t0
        busy = stats.setdefault("replica_busy", [0.0] * len(self.client.endpoints))
        for r, seconds in enumerate(log.busy(self.client.endpoints)):
            busy[r] += seconds
        return groups

    def _rollouts(self, state: DriverState, step: int, tokenizer: Any, reward: Any,
                  stats: dict[str, Any]) -> tuple[Any, dict[str, int]]:
        """Step ``step``'s pipeline batch, and the judge's calls and parse failures over it
        (``RewardComposer.judge_step``: a JudgeError, before anything is trained on those
        rewards, when too many replies could not be parsed)."""
        before = reward.judge_counters()
        rounds = itertools.count()  # the sampling rounds of the step (DAPO refills)
        batch = state.pipeline.step(
            step, state.stream,
            lambda reqs: self._generate(reqs, tokenizer, reward, stats, state.lengths, step,
                                        next(rounds)),
            int(self.rollout["prompts_per_step"]))
        return batch, reward.judge_step(before)

    def _evaluate(self, tokenizer: Any, reward: Any, context: Any, step: int = 0) -> float:
        """Held-out accuracy of the engines' current weights (``eval.every_steps``): the eval
        split, ``eval.samples`` answers each at ``eval.temperature`` (0: greedy), the mean
        correctness — the in-run counterpart of the eval jobs. Seeded (``runtime.seeds``)
        with ``train.seed`` and the step."""
        from runtime.filters import Group
        from runtime.prompts import eval_max_tokens
        from runtime.seeds import request_seed

        cfg = self.spec["eval"]
        rows = self._eval_prompts(tokenizer)
        prompts = [tokenizer.encode(str(r[self.prompt_key]), add_special_tokens=False)
                   for r in rows]
        sampling = {"temperature": float(cfg["temperature"]),
                    "max_tokens": eval_max_tokens(self.spec),
                    "seed": request_seed(int(self.train["seed"]), "eval", step)}
        completions = self.client.generate(prompts, n=int(cfg["samples"]),
                                           sampling=sampling)
        correct = []
        for row, comps in zip(rows, completions, strict=True):
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
            got = reward.group_rewards(str(row[self.prompt_key]), texts,
                                       str(row.get(self.answer_key, "")))
            group = Group(row.get("id"), got.rewards, scores=got.scores)
            correct.append(context.correctness(group))
        return float(np.concatenate(correct).mean()) if correct else 0.0

    def _over_budget(self, ledger: Any) -> bool:
        return self.budget is not None and ledger.generated >= self.budget

    def _finished(self, state: DriverState) -> bool:
        """All steps done, or the step that reached ``train.rollout_budget`` is done."""
        return state.step >= self.steps or self._over_budget(state.pipeline.ledger)

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

    def run(self) -> dict[str, Any]:
        """Run (or resume) every step; returns the summary written to rl_metrics."""
        import torch

        from runtime.rewards import build_reward

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
        if state.step > 0:  # the engines start from policy_sft: load the last weights
            self.weight_transfer.push(self.client, str(state.step),
                                      path=str(paths.version(state.step)))
        writer = _tensorboard(paths.root / "tensorboard", self.log)
        bar = _progress(self.steps, state.step)
        while not self._finished(state):
            step = state.step
            t0 = time.monotonic()
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
            payload.update(step=step, batch_id=batch_id, version=step,
                           optimizer_steps=state.optimizer_steps,
                           last=last)
            tmp = paths.batch(step).with_name(f".batch-{step}.pt.partial-{batch_id[:8]}")
            torch.save(payload, tmp)
            os.replace(tmp, paths.batch(step))
            done = self._wait_done(step, batch_id)
            paths.batch(step).unlink(missing_ok=True)
            tm = done.get("metrics") or {}
            self.weight_transfer.push(self.client, str(step + 1),
                                      path=str(paths.version(step + 1)))
            led = batch.ledger
            wall = time.monotonic() - t0
            evaluated = None
            if self.eval_every and ((step + 1) % self.eval_every == 0 or last):
                evaluated = self._evaluate(tokenizer, reward, pipeline.ctx, step)
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
                "reshaped_advantage_share": tm.get("reshaped_advantage_share"),
                "responses_trained": int(payload["input_ids"].shape[0]),
                "tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9),
                **replica_metrics(stats),
                "entropy": tm.get("entropy"),
                "clip_fraction": {k.split("/", 1)[1]: v for k, v in tm.items()
                                  if k.startswith("clip_frac/")},
                "clip_frac": tm.get("clip_frac"),
                "train_inference_gap": tm.get("train_inference_gap"),
                "kl": tm.get("kl"),
                "loss": tm.get("loss"),
                "grad_norm": tm.get("grad_norm"),
                "lr": tm.get("lr"),
                "wall_seconds": wall,
            }
            line.update(judged)  # judge_calls, judge_parse_failures (http judge)
            if evaluated is not None:
                line["eval_accuracy"] = evaluated
            with open(paths.metrics, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if writer is not None:
                for key, value in line.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(f"rl/{key}", value, step)
                for key, value in line["clip_fraction"].items():
                    writer.add_scalar(f"rl/clip_fraction/{key}", value, step)
                for r, value in enumerate(line["replica_idle_fraction"]):
                    writer.add_scalar(f"rl/replica_idle_fraction/{r}", value, step)
                writer.flush()
            state.optimizer_steps = int(done.get("optimizer_steps", state.optimizer_steps))
            state.wall_seconds += wall
            state.metrics_lines += 1
            state.step = step + 1
            save_state(paths.state, state)
            bar(line)
        if writer is not None:
            writer.close()
        led = state.pipeline.ledger
        led.check()
        if state.step < self.steps:
            self.log.info("rollout budget %d reached after %d steps (%d rollouts)",
                          self.budget, state.step, led.generated)
        return {"rollouts_generated": led.generated,
                "rollouts_wasted": led.wasted,
                "rollouts_reshaped": led.reshaped,
                "rollouts_zero_variance": led.zero_variance,
                "wall_seconds": state.wall_seconds,
                "steps": state.step,
                "ledger": led.to_dict()}


def replica_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The metrics line's rollout-replica keys from one step's generation ``stats``:
    ``generation_seconds``, and per replica (endpoint order) ``replica_busy_seconds`` and
    ``replica_idle_fraction`` (``runtime.rollout.replica_time``)."""
    from runtime.rollout.replica_time import idle_fraction

    wall = float(stats["seconds"])
    busy = [float(b) for b in stats.get("replica_busy", [])]
    return {"generation_seconds": wall, "replica_busy_seconds": busy,
            "replica_idle_fraction": [idle_fraction(b, wall) for b in busy]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tensorboard(folder: Path, log: Any) -> Any:
    """A TensorBoard writer into ``folder``; None (metrics.jsonl only) when the tensorboard
    package is not installed. Any other error (a broken install, a failing dependency of
    torch's writer) propagates."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "tensorboard":
            raise
        log.warning("no TensorBoard events (%s): metrics.jsonl only",
                    " ".join(str(exc).split()))
        return None
    return SummaryWriter(str(folder))


def _progress(total: int, start: int) -> Callable[[dict[str, Any]], None]:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else a log line per step."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        bar = tqdm(total=total, initial=start, desc="rl", unit="step")

        def update(line: dict[str, Any]) -> None:
            bar.set_postfix(reward=line["reward_mean"], zv=line["zero_variance_rate"])
            bar.update(1)
        return update

    def log_line(line: dict[str, Any]) -> None:
        def num(key: str, fmt: str) -> str:
            value = line.get(key)
            return "n/a" if value is None else format(value, fmt)

        print(f"[rlspec {time.strftime('%H:%M:%S', time.gmtime())}] rl: step {line['step'] + 1}/"
              f"{total}: reward {num('reward_mean', '.3f')}, accuracy "
              f"{num('train_accuracy', '.3f')}, zero-variance {num('zero_variance_rate', '.2f')}, "
              f"{line['rollouts_generated']} rollouts, {num('tokens_per_second', '.0f')} tok/s, "
              f"{line['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    return log_line


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)
