"""Evidence that each prompt matters (issue 16): the method's effects, measured over seeds.

Every run starts from the same SFT policy: the first run of the evidence spec
(``examples/tiny/evidence.yaml``, the embedded task in the paper's regime) produces the
dataset, the random init, the SFT policy, the held-out accuracy before RL and the offline
screen; every other run copies those jobs (``rlspec run`` skips a finished job) and differs
only in its RL configuration and ``train.seed``, which seeds the rollout engine's sampling
and the trainer (``runtime/seeds.py``): two runs with one seed are identical, different
seeds draw different rollouts from the same start. Every run computes with one torch thread
(``OMP_NUM_THREADS=1``), so its figures do not depend on ``--jobs``; its learning-rate
schedule spans the budget's steps (budget ÷ (n · prompts per step)).

Section Z, zero-variance elimination (``rlspec run``, equal rollout budget per run):

* vanilla GRPO (no filters, group advantages, flat groups kept with A = 0), DAPO dynamic
  sampling (flat groups dropped, over-sampling and refills), the spec's full multi-stage ZVE,
  and the full ZVE with each of its five stages removed in turn;
* per run: rollouts generated until the first in-run evaluation at the target accuracy,
  **with the offline screen's proxy rollouts charged** (``ledger.screening``: samples ×
  proxy cost ratio ÷ reuse epochs), final held-out accuracy at the equal budget, and the
  zero-variance rate (groups flat after reward and shaping ÷ groups generated);
* target = accuracy before RL + half the largest median final gain over configurations.
  A run that never reaches it counts as ∞ ("not reached"), which a median handles.

Section E, policy losses under stress (a constant learning rate and 4 optimizer steps per
rollout batch, so the importance ratios move and clipping acts): ESPO (α = 0.02,
ρ = 0.2), GRPO/DAPO clip (0.2, 0.28) and GSPO (3e-4, 4e-4), the papers' settings, each with
the spec's ZVE. Per run: entropy at the start and end of RL, clip fractions (ESPO: per
entropy group), final accuracy; a seed *collapses* when its final held-out accuracy is below
the accuracy before RL.

Section R, router replay (in-process, the SFT policy, prompts of the eval split): a copy of
the policy is the engine (KV-cache sampling at temperature 1, recording the experts of every
token as vLLM's ``routed_experts`` does); the trainer scores the same sequences in one
teacher-forced forward with off (its own routing), R2 (routing recorded in its own forward
before the updates) and R3 (the engine's routing). Two precision pairs: the same precision
(engine and trainer bf16: only the computation differs, KV-cache decode vs one full forward)
and bf16 engine vs fp32 trainer; at the start (same weights) and after a few AdamW updates of
the trainer. Mean |logp_train − logp_rollout| over response tokens, reported as ratios to
off, with the share of (token, layer) routing decisions on which engine and trainer differ.
The last line's R3 figure is the same precision *after* the updates: at the start, in the
same precision on a CPU, no routing decision differs (the table shows it), so replay has
nothing to remove there.

Statistics: per configuration the median over seeds with a 95 % percentile-bootstrap
interval (10,000 resamples of the seeds, fixed generator); ratios to vanilla / off are paired
per seed (the same seed draws the same start) and bootstrapped the same way.

Run: ``python bench/evidence.py --quick`` (3 seeds, short runs, under 30 minutes on 2 cores)
or ``python bench/evidence.py`` (5 seeds); ``--workdir DIR`` keeps the runs and the plots
(re-running on the same folder re-reads finished runs), ``--jobs N`` runs N at a time,
``--sections E --stress-lr 3e-4`` runs section E alone at another learning rate.
The last line reads ``ZVE/vanilla rollouts to target: R (95% CI a–b), N seeds; R3 gap same
precision: G× of off``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench.evidence_replay import section_r  # noqa: E402
from bench.stats import fmt_ci, median_ci, quantile  # noqa: E402
from bench.zve import rollouts_to  # noqa: E402

SPEC = ROOT / "examples" / "tiny" / "evidence.yaml"
SHARED_JOBS = ("dataset", "policy_init", "policy_sft", "eval_before", "pass_rates")


@dataclass(frozen=True)
class Mode:
    """How much to run: seeds, the RL rollout budget per run and the stress settings."""

    seeds: int
    budget: int           # rollouts generated per RL run (train.rollout_budget)
    eval_every: int       # RL steps between in-run held-out evaluations
    stress_lr: float      # section E's learning rate
    replay_batch: int     # section R: sequences per seed
    drift_steps: int      # section R: AdamW updates of the trainer


QUICK = Mode(seeds=3, budget=12_800, eval_every=20, stress_lr=1e-3, replay_batch=64,
             drift_steps=3)
FULL = Mode(seeds=5, budget=38_400, eval_every=25, stress_lr=1e-3, replay_batch=128,
            drift_steps=3)


# ---------------------------------------------------------------------------------- runs
@functools.cache
def evidence_spec() -> dict[str, Any]:
    """The evidence spec's YAML, read once (callers copy what they change)."""
    return yaml.safe_load(SPEC.read_text())


def flow(value: Any) -> str:
    """A ``--set`` value in YAML flow style (JSON is YAML)."""
    return json.dumps(value)


def zve_configs() -> list[tuple[str, list[str]]]:
    """(name, --set overrides) of section Z; the first is the reference (vanilla)."""
    full = copy.deepcopy(evidence_spec()["filters"])
    dapo = [{"type": "flat_groups", "action": "drop", "oversample": 1.5, "max_refills": 2,
             "fallback": "shrink"}]
    group = "algorithm.advantage.estimator=group"
    configs = [("vanilla GRPO", ["filters=[]", group]),
               ("DAPO dynamic sampling", [f"filters={flow(dapo)}", group]),
               ("full ZVE", [])]
    for stage in full:
        rest = [s for s in full if s is not stage]
        sets = [f"filters={flow(rest)}"]
        if stage["type"] == "flat_groups":
            sets.append(group)  # RL-ZVP advantages need the stage that marks flat groups
        configs.append((f"ZVE − {stage['type']}", sets))
    return configs


def loss_configs(mode: Mode) -> list[tuple[str, list[str]]]:
    """Section E: one loss each, at the stress learning rate, 4 optimizer steps per batch."""
    stress = [f"train.optimizer.lr={mode.stress_lr}", f"train.optimizer.min_lr={mode.stress_lr}",
              "train.global_batch_size=32"]
    # the lr is in the name, hence in the run folder: a workdir holds each lr's runs apart
    return [(f"{loss.upper()} lr {mode.stress_lr:g}", [f"algorithm.loss={loss}", *stress])
            for loss in ("espo", "grpo", "gspo")]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@dataclass
class Run:
    config: str
    seed: int
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    ledger: dict[str, Any]

    @property
    def before(self) -> float:
        return float(self.summary["eval_accuracy_before"])

    @property
    def final(self) -> float:
        return float(self.summary["eval_accuracy_after"])

    @property
    def screening(self) -> float:
        return float(self.ledger.get("screening") or 0.0)


class Runner:
    """``rlspec run`` of the evidence spec into ``workdir/<config>/seed-<s>``."""

    def __init__(self, workdir: Path, mode: Mode, jobs: int = 1) -> None:
        self.workdir, self.mode, self.jobs = workdir, mode, jobs
        self.start = workdir / "start"
        self.spec = evidence_spec()
        # one torch thread per process: OpenMP threads spinning against each other on shared
        # cores cost far more than they bring, and the figures do not depend on --jobs
        # (a thread count changes float reduction order, hence the sampled tokens)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def overrides(self, seed: int, sets: Sequence[str], budget: int | None = None) -> list[str]:
        """The ``--set`` values of one run: seed, budget, steps, eval cadence, then ``sets``."""
        budget = self.mode.budget if budget is None else budget
        # the lr schedule spans the budget's steps (n · prompts_per_step rollouts each); a run
        # that spends more per step (DAPO's refills, grown groups) stops at the budget first
        per_step = self.spec["rollout"]["n"] * self.spec["rollout"]["prompts_per_step"]
        return [f"train.seed={seed}", f"train.rollout_budget={budget}",
                f"train.steps={max(1, budget // per_step)}",
                f"eval.every_steps={self.mode.eval_every}", *sets]

    def _args(self, out: Path, seed: int, sets: Sequence[str], budget: int | None = None) -> list[str]:
        args = [sys.executable, "-m", "compiler.main", "run", str(SPEC), "--out", str(out)]
        for value in self.overrides(seed, sets, budget):
            args += ["--set", value]
        return args

    def run(self, config: str, seed: int, sets: Sequence[str]) -> Run:
        out = self.workdir / slug(config) / f"seed-{seed}"
        if not (out / "summary.json").is_file():
            for job in SHARED_JOBS:
                src = self.start / "artifacts" / job
                if src.is_dir() and not (out / "artifacts" / job).exists():
                    shutil.copytree(src, out / "artifacts" / job)
            proc = subprocess.run(self._args(out, seed, sets), cwd=ROOT, capture_output=True,
                                  text=True, check=False, env=self.env)
            if proc.returncode != 0:
                raise SystemExit(f"rlspec run failed for {out} (see {out}/logs):\n"
                                 f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        return self.load(config, seed, out)

    @staticmethod
    def load(config: str, seed: int, out: Path) -> Run:
        ledger = out / "artifacts" / "rl" / "ledger.json"
        return Run(config, seed, json.loads((out / "summary.json").read_text()),
                   [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
                   json.loads(ledger.read_text()) if ledger.is_file() else {})

    def prepare_start(self) -> None:
        """The shared start: the full spec's pre-RL jobs, run once (a 1-step RL run)."""
        if (self.start / "artifacts" / "pass_rates").is_dir():
            return
        args = self._args(self.start, 0, [], budget=1)
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the shared start failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def grid(self, configs: Sequence[tuple[str, list[str]]]) -> dict[str, list[Run]]:
        """Every (config, seed) run, ``self.jobs`` at a time; ordered by config then seed."""
        tasks = [(name, seed, sets) for name, sets in configs for seed in range(self.mode.seeds)]
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            runs = list(pool.map(lambda t: self.run(*t), tasks))
        out: dict[str, list[Run]] = {name: [] for name, _ in configs}
        for r in runs:
            out[r.config].append(r)
        return out


# -------------------------------------------------------------------------- section Z
def zero_variance_rate(run: Run) -> float:
    return float(run.ledger.get("groups_zero_variance", 0)) / max(1, run.ledger.get("groups_generated", 1))


def _paired_ratios(xs: Sequence[float], base: Sequence[float]) -> list[float]:
    """x / base per seed; ∞ when only the configuration missed the target, 0 when only the
    reference did, nan when both did (then no ratio is reported)."""
    out = []
    for x, b in zip(xs, base, strict=True):
        if math.isinf(x) and math.isinf(b):
            out.append(math.nan)
        else:
            out.append(0.0 if math.isinf(b) else x / b)
    return out


def _ratio_ci(ratios: Sequence[float]) -> tuple[float, float, float]:
    return median_ci(ratios) if not any(math.isnan(r) for r in ratios) else (math.nan,) * 3


def section_z(runs: dict[str, list[Run]]) -> tuple[tuple[float, float, float], int, list[str]]:
    """The ZVE table; returns full ZVE's rollouts-to-target ratio to vanilla (screen charged)."""
    names = list(runs)
    base = runs[names[0]]
    before = base[0].before
    gains = {n: quantile([r.final - r.before for r in rs], 0.5) for n, rs in runs.items()}
    lines = ["== Z. zero-variance elimination: equal rollout budget, same SFT start =="]
    if max(gains.values()) <= 0:  # nothing to reach: every configuration ended below its start
        lines.append(f"no configuration gained held-out accuracy (before RL {100 * before:.1f}%); "
                     "no target, no ratio")
        target = math.inf
    else:
        target = before + 0.5 * max(gains.values())
        lines.append(f"held-out accuracy before RL {100 * before:.1f}%; target = before + half the "
                     f"largest median gain = {100 * target:.1f}%; medians over seeds (95% bootstrap CI)")
    hdr = (f"{'configuration':28s} {'to target, k rollouts':>22s} {'reached':>7s} "
           f"{'final acc %':>18s} {'zero-variance rate':>19s} {'to target / vanilla':>20s} "
           f"{'same, screen free':>18s}")
    lines += [hdr, "-" * len(hdr)]
    rl_only = {n: [math.inf if (x := rollouts_to(r.metrics, target)) is None else float(x) for r in rs]
               for n, rs in runs.items()}
    charged = {n: [x + r.screening for x, r in zip(rl_only[n], rs, strict=True)] for n, rs in runs.items()}
    ratio_zve: tuple[float, float, float] = (math.nan,) * 3  # type: ignore[assignment]
    for name, rs in runs.items():
        ratio = _ratio_ci(_paired_ratios(charged[name], charged[names[0]]))
        free = _ratio_ci(_paired_ratios(rl_only[name], rl_only[names[0]]))
        if name == "full ZVE":
            ratio_zve = ratio
        lines.append(f"{name:28s} {fmt_ci(median_ci(charged[name]), 1e-3, 1):>22s} "
                     f"{sum(math.isfinite(c) for c in charged[name]):>3d}/{len(rs):<3d} "
                     f"{fmt_ci(median_ci([r.final for r in rs]), 100, 1):>18s} "
                     f"{fmt_ci(median_ci([zero_variance_rate(r) for r in rs])):>19s} "
                     f"{fmt_ci(ratio):>20s} {fmt_ci(free):>18s}")
    screen = max((r.screening for rs in runs.values() for r in rs), default=0.0)
    lines.append(f"to target: rollouts generated until the first in-run evaluation at the target, "
                 f"plus the offline screen's proxy cost ({screen:.0f} rollouts) where the screen "
                 f"runs; 'screen free' leaves it out; budget {base[0].summary['rollouts_generated']} "
                 "rollouts per run")
    lines.append("per seed, final acc % / k rollouts to target (screen charged):")
    for n, rs in runs.items():
        lines.append(f"  {n:26s} " + "  ".join(
            f"{100 * r.final:4.1f}/{c / 1e3:.1f}" for r, c in zip(rs, charged[n], strict=True)))
    return ratio_zve, len(base), lines


# -------------------------------------------------------------------------- section E
def _window_mean(metrics: list[dict[str, Any]], key: str, first: bool, frac: float = 0.1) -> float:
    vals = [m[key] for m in metrics if m.get(key) is not None]
    if not vals:
        return math.nan
    k = max(1, int(len(vals) * frac))
    return float(np.mean(vals[:k] if first else vals[-k:]))


def _clip(metrics: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for m in metrics:
        groups = m.get("clip_fraction") or {}
        for k, v in (groups.items() if groups else [("all", m.get("clip_frac"))]):
            if v is not None:
                out.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def section_e(runs: dict[str, list[Run]], mode: Mode) -> list[str]:
    lines = ["== E. policy losses at a stress learning rate "
             f"(lr {mode.stress_lr:g} constant, 4 optimizer steps per rollout batch), full ZVE ==",
             f"{'loss':14s} {'collapsed':>9s} {'final acc %':>20s} {'entropy start→end':>20s} "
             f"{'clip fraction (mean over steps)':>34s}"]
    for name, rs in runs.items():
        collapsed = sum(r.final < r.before for r in rs)
        h0 = quantile([_window_mean(r.metrics, "entropy", True) for r in rs], 0.5)
        h1 = quantile([_window_mean(r.metrics, "entropy", False) for r in rs], 0.5)
        clips: dict[str, list[float]] = {}
        for r in rs:
            for k, v in _clip(r.metrics).items():
                clips.setdefault(k, []).append(v)
        clip = " ".join(f"{k} {quantile(v, 0.5):.4f}" for k, v in clips.items())
        lines.append(f"{name:14s} {collapsed:>4d}/{len(rs):<4d} "
                     f"{fmt_ci(median_ci([r.final for r in rs]), 100, 1):>20s} "
                     f"{h0:9.3f} → {h1:<8.3f} {clip:>34s}")
    lines.append("collapsed: final held-out accuracy below the accuracy before RL; entropy: mean "
                 "token entropy of the first / last 10% of steps (median over seeds); ESPO's clip "
                 "fractions are per entropy group (high / low), the others' over all tokens")
    return lines


# ------------------------------------------------------------------------------- plots
def plot_curves(runs: dict[str, list[Run]], path: Path, title: str) -> None:
    """Held-out accuracy (median over seeds) against rollouts: left RL rollouts only, right
    with the offline screen's proxy rollouts charged; each curve starts at the accuracy
    before RL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, rs in runs.items():
        curves = []
        for r in rs:
            total, xs, ys = 0, [0.0], [100 * r.before]
            for m in r.metrics:
                total += m["rollouts_generated"]
                if m.get("eval_accuracy") is not None:
                    xs.append(total / 1e3)
                    ys.append(100 * m["eval_accuracy"])
            curves.append((xs, ys))
        k = min(len(c[1]) for c in curves)
        x = np.median([c[0][:k] for c in curves], axis=0)
        y = np.median([c[1][:k] for c in curves], axis=0)
        width = 2 if name in ("vanilla GRPO", "full ZVE") or name.startswith("ESPO") else 1
        axes[0].plot(x, y, label=name, lw=width)
        axes[1].plot(x + rs[0].screening / 1e3, y, label=name, lw=width)
    axes[0].set_xlabel("RL rollouts generated (thousands)")
    axes[1].set_xlabel("rollouts generated, offline screen included (thousands)")
    axes[0].set_ylabel("held-out accuracy, % (median over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, short runs (under 30 min on 2 cores)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3 / 5)")
    ap.add_argument("--sections", default="ZER", help="which sections to run (default ZER)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs and plots here")
    ap.add_argument("--jobs", type=int, default=2, help="RL runs at a time (default 2)")
    ap.add_argument("--stress-lr", type=float, default=None,
                    help=f"section E's learning rate (default {FULL.stress_lr:g}); a lower one "
                         "shows which losses collapse first")
    args = ap.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.seeds:
        mode = dataclasses.replace(mode, seeds=args.seeds)
    if args.stress_lr:
        mode = dataclasses.replace(mode, stress_lr=args.stress_lr)
    t0 = time.perf_counter()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rlspec-evidence-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(workdir, mode, args.jobs)
    say: Callable[[str], None] = lambda s: print(s, flush=True)  # noqa: E731
    say(f"evidence: {SPEC.relative_to(ROOT)}, {'quick' if args.quick else 'full'}: {mode.seeds} seeds, "
        f"rollout budget {mode.budget} per run, workdir {workdir}")
    runner.prepare_start()
    ratio = (math.nan,) * 3
    n_seeds = mode.seeds
    if "Z" in args.sections:
        zruns = runner.grid(zve_configs())
        ratio, n_seeds, lines = section_z(zruns)
        for line in lines:
            say(line)
        plot_curves(zruns, workdir / "zve.png", "Zero-variance elimination: accuracy per rollout")
        say(f"plot: {workdir / 'zve.png'}")
    if "E" in args.sections:
        eruns = runner.grid(loss_configs(mode))
        for line in section_e(eruns, mode):
            say(line)
        plot_curves(eruns, workdir / "losses.png", f"Losses at lr {mode.stress_lr:g}")
        say(f"plot: {workdir / 'losses.png'}")
    r3 = math.nan
    if "R" in args.sections:
        r3, lines = section_r(runner.start, mode)
        for line in lines:
            say(line)
    say(f"total {time.perf_counter() - t0:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    r, lo, hi = ratio
    say("(R3 gap same precision: after the updates, the row 'same precision … after' of R)")
    say(f"ZVE/vanilla rollouts to target: {r:.2f} (95% CI {lo:.2f}–{hi:.2f}), {n_seeds} seeds; "
        f"R3 gap same precision: {r3:.3f}× of off")


if __name__ == "__main__":
    main()
