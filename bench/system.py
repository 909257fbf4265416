r"""The high-throughput RL system as a ladder of speed-ups (issue 13; the paper's Table 1).

Each rung adds one system feature to the rung above it; a rung's *cumulative* speed-up is
its throughput over the baseline's, its *per-rung gain* that over the rung above. Two
sections:

Section "embedded" (measured). ``examples/tiny/spec.yaml`` compiled with two embedded engine
replicas (``cluster.gpus_per_node=2``, rollout TP 1: ``plan.rollout_replicas`` = 2, started
by ``jobs/rl/rollout.sh`` as two processes), 16 prompts × 4 samples per step, a 30-step SFT
and ``STEPS`` RL steps. Answer lengths: the arithmetic generator has no length knob, so its
spread comes from operand sizes — 1–5-digit operands with + − × give answers of 1 to 10
characters (``data.generator``); a small prompt set (``TRAIN_SIZE`` prompts) makes every
prompt recur across the steps, so the length predictor has a history to balance by. The
jobs before RL (data, init, sft) run once; then, for every rung, ``bash jobs/rl/launch.sh``
of its own bundle runs on a fresh copy of that run dir (same data, same SFT policy, same
seeds), after one uncounted warm-up run of the baseline (the first launch pays cold
caches), ``ROUNDS`` rounds in alternating order (round 2 runs the rungs in reverse) so that
a steady drift of the machine hits every rung alike. Re-running with the same ``--workdir``
re-reads the finished runs (run dir ``round<r>-<i>``: round r, i-th in its order) of the same
number of steps and runs the others. Rungs:

    baseline            reward_overlap false, length_balancing false, max_staleness 0,
                        reward_workers 1 (the driver decodes and scores in its own thread)
    + parallel detok    system.reward_workers 2 (``runtime.scoring``: spawned processes
                        decode and score each group as its chunk returns)
    + reward overlap    system.reward_overlap true
    + length balancing  system.length_balancing true (LPT over predicted lengths)
    + async k=1         system.max_staleness 1 (generate step s+1 while step s trains)
    FP8 (side rung)     + rollout.fp8 on top of async: numerics only on this CPU

From each run's ``metrics.jsonl``: rollouts/s = Σ rollouts_generated / Σ wall_seconds (the
steps' wall time, generation and training, as the driver logs it; the engines' and
trainer's start-up is outside it), trainer tokens/s = Σ (generated tokens × responses
trained / rollouts generated) / Σ wall_seconds with generated tokens = tokens_per_second ×
generation_seconds, the generation share Σ generation_seconds / Σ wall_seconds, the
trainer share Σ (the trainer's seconds per step, from the "step k/N trained (…, t s)" lines
of ``logs/rl-train.log``) / Σ wall_seconds, and the mean of ``replica_idle_fraction`` over
steps and replicas. Each figure printed is the median over the rounds of that round's value
(a ratio: to the same round's baseline), so that one round hit by a burst of load does not
decide it; the per-round ratios are printed too (their spread is the noise of this shared
machine). From the baseline's shares, Amdahl bounds what each kind of rung can buy here
(printed). W = 2 reward workers, not more: this machine has 2 cores, already shared by the
driver, the two engine replicas and the trainer, so a third worker could only time-slice
with the others; 2 is the smallest pool that scores two groups at once, and it pays the
pool's cost (pickling each group's token ids and result; the workers start with the
engines, outside the steps' wall time) for whatever the driver's thread gains. Every rung
uses
``system.weight_sync_tolerance`` 0.05 so that the FP8 rung's rounding passes the trainer's
weight-sync check (the tolerance only decides when a run stops, not its speed).

Section "simulated 245B" (a model, not a measurement): ``bench/system_sim.py``, the scale
of ``examples/compassmax-245b.yaml`` through the runtime's scheduling code.

Last line: ``system ladder: cumulative X.XXx (embedded, N replicas); simulated 245B: Y.YYx``
(X: the async rung's rollouts/s over the baseline's; Y: the simulated async rung's).

Run: ``python bench/system.py`` (15–20 minutes on 2 busy cores; ``--quick``: one round of
4 steps, about 6 minutes; ``--sections simulated`` alone takes seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench.system_sim import SimParams, simulated  # noqa: E402
from runtime.ports import free_ports  # noqa: E402

PY = Path(sys.executable)
TRAINED = re.compile(r"step \d+/\d+ trained \(\d+ responses, ([\d.]+) s\)")  # rl-train.log
SPEC = ROOT / "examples" / "tiny" / "spec.yaml"
REPLICAS = 2
TRAIN_SIZE = 32
STEPS, ROUNDS = 6, 2
QUICK_STEPS, QUICK_ROUNDS = 4, 1

BASE = [
    f"cluster.gpus_per_node={REPLICAS}", "rollout.prompts_per_step=16", "rollout.n=4",
    "train.global_batch_size=64", "train.micro_batch_size=16", "sft.steps=30",
    "rollout.max_tokens=16", "data.generator.max_digits=5",
    "data.generator.operations=['+', '-', '*']", f"data.generator.train_size={TRAIN_SIZE}",
    "filters=[{type: flat_groups, action: rl_zvp}]", "eval.enabled=false",
    "system.weight_sync_tolerance=0.05",
]
OFF = {"system.reward_overlap": "false", "system.length_balancing": "false",
       "system.max_staleness": "0", "rollout.fp8": "false", "system.reward_workers": "1"}
REWARD_WORKERS = 2  # the parallel-detok rung's W: one per core of this machine (module doc)
# (name, key changed from the rung above; None: not built)
EMBEDDED_RUNGS: list[tuple[str, dict[str, str] | None]] = [
    ("baseline (sync)", {}),
    ("+ parallel detok", {"system.reward_workers": str(REWARD_WORKERS)}),
    ("+ reward overlap", {"system.reward_overlap": "true"}),
    ("+ length balancing", {"system.length_balancing": "true"}),
    ("+ async k=1", {"system.max_staleness": "1"}),
    ("FP8 rollout (side)", {"rollout.fp8": "true"}),
]


# ---------------------------------------------------------------------------- embedded
def _env(run_dir: Path, port: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RLSPEC_")) and k != "RANK"}
    env["PATH"] = f"{PY.parent}{os.pathsep}{env.get('PATH', '')}"
    env["RLSPEC_RUN_DIR"] = str(run_dir)
    env["RLSPEC_PYTHON"] = str(PY)
    env["PYTHONPATH"] = str(ROOT)
    if port is not None:
        env["RLSPEC_ROLLOUT_BASE_PORT"] = str(port)
    return env


def _compile(out: Path, overrides: list[str]) -> Path:
    args = [str(PY), "-m", "compiler.main", "compile", str(SPEC), "-o", str(out), "--force"]
    for o in overrides:
        args += ["--set", o]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=300, cwd=ROOT,
                   env=_env(out))
    return out


def _launch(bundle: Path, job: str, run_dir: Path, timeout: float = 900) -> None:
    proc = subprocess.run(["bash", str(bundle / "jobs" / job / "launch.sh")],
                          env=_env(run_dir, free_ports(REPLICAS)), capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} job failed ({run_dir}):\n{proc.stderr[-3000:]}")


def _rung_overrides(steps: int) -> list[tuple[str, list[str] | None]]:
    """Each rung's --set list (cumulative: a rung keeps the keys of the rungs above)."""
    keys = dict(OFF)
    out: list[tuple[str, list[str] | None]] = []
    for name, change in EMBEDDED_RUNGS:
        if change is None:
            out.append((name, None))
            continue
        keys.update(change)
        out.append((name, [*BASE, f"train.steps={steps}", *(f"{k}={v}" for k, v in keys.items())]))
    return out


def _run_stats(run_dir: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in
             (run_dir / "artifacts" / "rl" / "metrics.jsonl").read_text().splitlines()]
    gen_tokens = [m["tokens_per_second"] * m["generation_seconds"] for m in lines]
    trained = sum(t * m["responses_trained"] / max(m["rollouts_generated"], 1)
                  for t, m in zip(gen_tokens, lines, strict=True))
    idle = [f for m in lines for f in m["replica_idle_fraction"]]
    log = (run_dir / "logs" / "rl-train.log").read_text(encoding="utf-8", errors="replace")
    return {"wall": sum(m["wall_seconds"] for m in lines),
            "train": sum(float(x) for x in TRAINED.findall(log)),
            "rollouts": sum(m["rollouts_generated"] for m in lines),
            "trained_tokens": trained,
            "generation": sum(m["generation_seconds"] for m in lines),
            "idle_sum": sum(idle), "idle_n": len(idle),
            "staleness": sorted({m["staleness"] for m in lines}),
            "steps": len(lines)}


def embedded(workdir: Path, steps: int, rounds: int) -> float:
    print(f"== embedded: examples/tiny/spec.yaml, {REPLICAS} embedded engine replicas, "
          f"16 prompts × 4 samples, {steps} RL steps, {rounds} round(s) ==")
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)", flush=True)
    rungs = _rung_overrides(steps)
    built = [(name, ov) for name, ov in rungs if ov is not None]
    bundles = {name: _compile(workdir / f"bundle-{i}", ov)
               for i, (name, ov) in enumerate(built)}
    base_run = workdir / "prepared"
    first = bundles[built[0][0]]
    if not (base_run / "artifacts" / "policy_sft" / ".complete").exists():
        for job in ("data", "init", "sft"):
            _launch(first, job, base_run)
    def run(name: str, run_dir: Path) -> dict[str, Any]:
        metrics = run_dir / "artifacts" / "rl" / "metrics.jsonl"
        if (run_dir / "artifacts" / "rl" / ".complete").is_file() and \
                len(metrics.read_text().splitlines()) == steps:  # finished earlier: re-read
            st = _run_stats(run_dir)
            print(f"  {run_dir.name}: {name:<20} re-read, steps {st['wall']:5.1f} s", flush=True)
            return st
        if run_dir.exists():
            shutil.rmtree(run_dir)
        for art in ("dataset", "policy_init", "policy_sft"):
            shutil.copytree(base_run / "artifacts" / art, run_dir / "artifacts" / art)
        t0 = time.monotonic()
        _launch(bundles[name], "rl", run_dir)
        st = _run_stats(run_dir)
        print(f"  {run_dir.name}: {name:<20} job {time.monotonic() - t0:5.1f} s, "
              f"steps {st['wall']:5.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        return st

    run(built[0][0], workdir / "warmup")  # not counted: the first launch pays cold caches
    per_round: list[dict[str, dict[str, Any]]] = []
    for r in range(rounds):
        order = built if r % 2 == 0 else built[::-1]  # ABBA…: linear drift cancels
        got: dict[str, dict[str, Any]] = {}
        for i, (name, _) in enumerate(order):
            got[name] = run(name, workdir / f"round{r + 1}-{i}")
        per_round.append(got)
    def med(values: list[float]) -> float:
        return float(np.median(values))

    def rate(st: dict[str, Any], key: str = "rollouts") -> float:
        return st[key] / st["wall"]

    def share(name: str, key: str) -> float:
        return med([g[name][key] / g[name]["wall"] for g in per_round])

    base_name = built[0][0]
    print(f"{'rung':<22}{'rollouts/s':>11}{'per-rung':>9}{'trainer tok/s':>14}"
          f"{'gen share':>10}{'train share':>12}{'idle':>6}{'staleness':>10}"
          "  per-round rollouts/s")
    prev = None
    cumulative = 1.0
    for name, ov in rungs:
        if ov is None:
            print(f"{name:<22}{'not built':>11}")
            continue
        per = [rate(g[name]) / rate(g[base_name]) for g in per_round]
        ratio = med(per)
        tok = med([rate(g[name], "trained_tokens") / rate(g[base_name], "trained_tokens")
                   for g in per_round])
        step = "" if prev is None else f"{ratio / prev:.2f}x"
        idle = med([g[name]["idle_sum"] / g[name]["idle_n"] for g in per_round])
        stale = sorted({s for g in per_round for s in g[name]["staleness"]})
        print(f"{name:<22}{ratio:>10.2f}x{step:>9}{tok:>13.2f}x"
              f"{share(name, 'generation'):>10.2f}{share(name, 'train'):>12.2f}{idle:>6.2f}"
              f"{','.join(map(str, stale)):>10}  {' '.join(f'{x:.2f}x' for x in per)}")
        if not name.startswith("FP8"):
            prev = ratio
            cumulative = ratio
    print("(each figure: the median over rounds of that round's value, ratios to the same "
          "round's baseline; gen share: Σ generation_seconds / Σ wall_seconds of a run, train "
          "share: the trainer's seconds over the same; idle: mean replica_idle_fraction. "
          "FP8 is numerics only on CPU — no FP8 kernels, the weights are rounded through "
          "float8 and computed in fp32 — so it cannot speed anything up here)")
    gen, train = share(base_name, "generation"), share(base_name, "train")
    per_step = med([g[base_name]["wall"] for g in per_round]) / steps
    print(f"context: baseline {per_step:.2f} s per step, {gen:.2f} of it generating, "
          f"{train:.2f} training")
    print(f"bounds from the baseline's shares (Amdahl): a rung that only shortens generation "
          f"and scoring gains at most 1/(1 − {gen:.2f}) = {1 / (1 - gen):.2f}x; async, which "
          f"hides the driver's part of the step behind training, at most "
          f"1/max({train:.2f}, {1 - train:.2f}) = {1 / max(train, 1 - train):.2f}x, and only "
          "where the two run on separate hardware")
    return cumulative


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"embedded: {QUICK_ROUNDS} round of {QUICK_STEPS} steps")
    ap.add_argument("--steps", type=int, default=None, help=f"RL steps per run (default {STEPS})")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"rounds of every rung, alternating order (default {ROUNDS})")
    ap.add_argument("--sections", default="embedded,simulated")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where bundles and run dirs go (default: a temporary directory); "
                         "its prepared/ run dir (data, init, sft) is reused when complete, "
                         "and a finished run of the same steps is re-read, not rerun")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    steps, rounds = (QUICK_STEPS, QUICK_ROUNDS) if args.quick else (STEPS, ROUNDS)
    steps, rounds = args.steps or steps, args.rounds or rounds
    x = y = float("nan")
    if "embedded" in sections:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            x = embedded(args.workdir, steps, rounds)
        else:
            with tempfile.TemporaryDirectory(prefix="rlspec-system-") as tmp:
                x = embedded(Path(tmp), steps, rounds)
        print()
    if "simulated" in sections:
        y = simulated(SimParams())["cumulative"]
    print(f"system ladder: cumulative {x:.2f}x (embedded, {REPLICAS} replicas); "
          f"simulated 245B: {y:.2f}x")


if __name__ == "__main__":
    main()

