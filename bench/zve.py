"""Zero-variance elimination (DESIGN.md §4): rollouts spent per informative group.

Section A (paper regime, simulated). A pool of 100,000 prompts with fixed true pass
rates from a Beta mixture (mass near 0 and near 1, a broad middle) such that vanilla
GRPO at n = 16 sees 60–80 % zero-variance groups. Each configuration runs through the
same filter code (``runtime.filters.simulation.simulate`` → ``build_pipeline``) with
Bernoulli rewards, the same seed, the same prompt pool, group size, prompts per step
and number of epochs:

(a) vanilla GRPO: no filters, flat groups kept with A = 0;
(b) DAPO dynamic sampling: ``flat_groups: drop`` with over-sampling, refills and the
    ``shrink`` fallback;
(c) the full multi-stage ZVE of ``examples/compassmax-245b.yaml`` (screen with a proxy
    at 0.1× policy cost reused for 3 epochs, adaptive group size, length shaping,
    RL-ZVP, history); the repetition penalty is left out because the simulation has no
    token ids (``simulation`` module doc);
(d) as (c) but the screen at full policy cost (``proxy_cost_ratio: 1.0``,
    ``reuse_epochs: 1``).

The proxy's pass rates are the policy's (a perfect proxy), so (c) and (d) differ only
in what the screen costs. Per configuration the ledger gives the zero-variance rate
(groups flat after reward and shaping), the wasted-rollout fraction (rollouts with no
gradient: kept flat + dropped + discarded, over generated) and rollouts per
informative group ``(generated + screening) / (n · informative groups)`` (1.0× ideal).

Screen accounting. The ledger books ``samples · proxy_cost_ratio / reuse_epochs`` once,
i.e. one epoch's share of the screen, whatever the number of epochs simulated. The
column ``x/inf·ep`` charges that share to every epoch of the run (E epochs → E shares:
the whole screen once when E = reuse_epochs, a fresh screen per epoch when
reuse_epochs = 1), which is what a run of E epochs pays; ``x/inf`` is the ledger's.

Section B (tiny-task RL, real policy). ``rlspec run`` of ``examples/tiny/spec.yaml`` three
times, with the same seed, data and SFT policy (the jobs before RL are shared) and the same
rollout budget (``train.rollout_budget``): (a) vanilla GRPO (no filters, group advantages),
(b) DAPO dynamic sampling (drop flat groups, over-sample 1.5×, 2 refills, shrink), (c) the
example's full multi-stage ZVE. Held-out accuracy is measured inside each run every
``TINY_EVAL_EVERY`` steps (``eval.every_steps``). Printed per policy: zero-variance rate,
wasted-rollout fraction, rollouts generated until held-out accuracy first reaches the
target (accuracy before RL plus half the best policy's final gain; "nan" when a policy
never reaches it), final held-out accuracy, and each as a ratio to vanilla GRPO. Re-running
with the same ``--workdir`` re-reads finished runs (``rlspec run`` resumes, nothing is redone).

Run: ``python -m bench.zve`` (or ``python bench/zve.py``); section A takes about a minute
on 2 cores, section B several minutes per policy (``--sections A`` or ``B``).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from runtime.filters.ledger import Ledger, rollouts_per_informative_group  # noqa: E402
from runtime.filters.simulation import simulate  # noqa: E402

SEED = 0
POOL = 100_000
GROUP_SIZE = 16
PROMPTS_PER_STEP = 512
EPOCHS = 3
MAX_TOKENS = 1024


# ---------------------------------------------------------------------------- section A
def pass_rate_pool(n: int = POOL, seed: int = SEED) -> np.ndarray:
    """True pass rates: 42 % Beta(0.1, 6) (near 0), 38 % Beta(6, 0.1) (near 1),
    20 % Beta(2, 2) (mixed)."""
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=n, p=[0.42, 0.38, 0.20])
    lo, hi, mid = rng.beta(0.1, 6.0, n), rng.beta(6.0, 0.1, n), rng.beta(2.0, 2.0, n)
    return np.where(comp == 0, lo, np.where(comp == 1, hi, mid))


def filters_245b() -> list[dict[str, Any]]:
    """The ``filters`` list of the 245B example, repetition penalty removed (no tokens)."""
    spec = yaml.safe_load((ROOT / "examples" / "compassmax-245b.yaml").read_text())
    stages = copy.deepcopy(spec["filters"])
    for s in stages:
        if s["type"] == "reward_shaping":
            s.pop("repetition", None)
    return stages


def configurations() -> list[tuple[str, list[dict[str, Any]]]]:
    zve = filters_245b()
    full_cost = copy.deepcopy(zve)
    for s in full_cost:
        if s["type"] == "offline_pass_rate":
            s["proxy_cost_ratio"], s["reuse_epochs"] = 1.0, 1
    dapo = [{"type": "flat_groups", "action": "drop", "oversample": 2.0,
             "max_refills": 8, "fallback": "shrink"}]
    return [
        ("(a) vanilla GRPO", []),
        ("(b) DAPO dynamic sampling", dapo),
        ("(c) multi-stage ZVE (245B)", zve),
        ("(d) ZVE, screen at full cost", full_cost),
    ]


def _screen_per_epoch(ledger: Ledger, epochs: int) -> float:
    """Rollouts per informative group with the screen's per-epoch share charged E times."""
    if ledger.groups_used == 0:
        return float("inf")
    return (ledger.generated + epochs * ledger.screening) / (ledger.group_size * ledger.groups_used)


def section_a() -> None:
    p = pass_rate_pool()
    expected = float(np.mean(p**GROUP_SIZE + (1 - p) ** GROUP_SIZE))
    print("== A. paper regime (simulated Bernoulli rewards, same filter code) ==")
    print(f"pool {POOL} prompts, n={GROUP_SIZE}, {PROMPTS_PER_STEP} prompts/step, "
          f"{EPOCHS} epochs, seed {SEED}")
    print(f"pool: mean pass rate {p.mean():.3f}; E[P(flat group at n={GROUP_SIZE})] = "
          f"{expected:.3f} (closed form)")
    rows = []
    for name, stages in configurations():
        t0 = time.perf_counter()
        res = simulate(stages, p, group_size=GROUP_SIZE, prompts_per_step=PROMPTS_PER_STEP,
                       epochs=EPOCHS, max_tokens=MAX_TOKENS, seed=SEED)
        led = res.ledger
        led.check()
        rows.append((name, res, time.perf_counter() - t0))
    base = rows[0][1].ledger
    base_z = base.zero_variance_rate
    base_w = base.wasted / base.generated
    base_x = rollouts_per_informative_group(base)
    hdr = (f"{'config':30s} {'steps':>5s} {'generated':>9s} {'screen':>8s} {'zv rate':>7s} "
           f"{'wasted':>6s} {'x/inf':>6s} {'x/inf·ep':>8s} | {'zv/a':>5s} {'wst/a':>5s} "
           f"{'x/a':>5s} {'x·ep/a':>6s} {'s':>4s}")
    print(hdr)
    print("-" * len(hdr))
    for name, res, dt in rows:
        led = res.ledger
        z, w = led.zero_variance_rate, led.wasted / led.generated
        x, xe = rollouts_per_informative_group(led), _screen_per_epoch(led, EPOCHS)
        print(f"{name:30s} {res.steps:5d} {led.generated:9d} {led.screening:8.0f} {z:7.3f} "
              f"{w:6.3f} {x:5.2f}x {xe:7.2f}x | {z / base_z:5.2f} {w / base_w:5.2f} "
              f"{x / base_x:5.2f} {xe / base_x:6.2f} {dt:4.1f}")
    print(f"vanilla check: 1/(1 - zv rate) = {1 / (1 - base_z):.2f}x "
          f"(measured {base_x:.2f}x)")
    print("details:")
    for name, res, _ in rows:
        led = res.ledger
        extra = (f"  used {led.groups_used}, reshaped {led.groups_reshaped}, "
                 f"kept_flat {led.groups_kept_flat}, dropped {led.groups_dropped} "
                 f"(discarded {led.groups_discarded}), grown rollouts {led.grown}, "
                 f"refills {led.refills}, screened out {led.prompts_screened_out}, "
                 f"skipped {led.prompts_skipped}")
        print(f" {name}:{extra}")
        for st in res.report["stages"]:
            if st.get("type") in ("flat_groups", "history", "adaptive_group_size"):
                keep = {k: v for k, v in st.items()
                        if k in ("pool_dry_steps", "missing_groups", "cooldowns", "retried",
                                 "skipped", "grown_groups", "extra_rollouts",
                                 "budget_capped_rounds")}
                print(f"   {st['type']}: {keep}")


# ---------------------------------------------------------------------------- section B
TINY = ROOT / "examples" / "tiny" / "spec.yaml"
# One budget and seed for every policy; each run stops after the step that reaches it.
TINY_BUDGET = 64_000
TINY_EVAL_EVERY = 25
SHARED_JOBS = ("dataset", "policy_init", "policy_sft", "eval_before")


def tiny_policies() -> list[tuple[str, list[str]]]:
    """(name, --set overrides) of the three policies on the tiny spec."""
    dapo = ("filters=[{type: flat_groups, action: drop, oversample: 1.5, max_refills: 2, "
            "fallback: shrink}]")
    return [
        ("(a) vanilla GRPO", ["filters=[]", "algorithm.advantage.estimator=group"]),
        ("(b) DAPO dynamic sampling", [dapo, "algorithm.advantage.estimator=group"]),
        ("(c) multi-stage ZVE (tiny)", []),
    ]


def _run_tiny(out: Path, overrides: list[str], shared_from: Path | None) -> dict[str, Any]:
    """``rlspec run`` of the tiny spec into ``out``; the jobs before RL are copied from the
    first policy's run (same spec up to the filters: same data, same SFT policy)."""
    import json
    import shutil
    import subprocess

    if shared_from is not None:
        for name in SHARED_JOBS:
            src = shared_from / "artifacts" / name
            if src.is_dir() and not (out / "artifacts" / name).exists():
                shutil.copytree(src, out / "artifacts" / name)
    args = [sys.executable, "-m", "compiler.main", "run", str(TINY), "--out", str(out),
            "--set", f"train.rollout_budget={TINY_BUDGET}", "--set", "train.steps=100000",
            "--set", f"eval.every_steps={TINY_EVAL_EVERY}"]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"rlspec run failed for {out}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ledger_path = out / "artifacts" / "rl" / "ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    return {"summary": summary, "metrics": metrics, "ledger": ledger}


def rollouts_to(metrics: list[dict[str, Any]], target: float) -> int | None:
    """Rollouts generated up to the first in-run evaluation at or above ``target``."""
    total = 0
    for line in metrics:
        total += int(line["rollouts_generated"])
        if line.get("eval_accuracy") is not None and line["eval_accuracy"] >= target - 1e-9:
            return total
    return None


def section_b(workdir: Path) -> None:
    print("== B. tiny-task RL (real policy and engine: examples/tiny through `rlspec run`) ==")
    print(f"same seed, data and SFT policy; rollout budget {TINY_BUDGET} per policy (each run "
          f"stops after the step that reaches it); held-out accuracy every {TINY_EVAL_EVERY} "
          "steps (greedy, eval split)")
    runs = []
    first = None
    for name, overrides in tiny_policies():
        t0 = time.perf_counter()
        out = workdir / name.split()[0].strip("()")
        res = _run_tiny(out, overrides, first)
        first = first or out
        runs.append((name, res, time.perf_counter() - t0))
    before = runs[0][1]["summary"]["eval_accuracy_before"]
    finals = [r["summary"]["eval_accuracy_after"] for _, r, _ in runs]
    target = before + 0.5 * (max(finals) - before)  # half the best policy's gain
    print(f"held-out accuracy before RL: {100 * before:.1f}%; target accuracy = before + half "
          f"the best final gain: {100 * target:.1f}%")

    def stats(res: dict[str, Any]) -> dict[str, float]:
        s, m = res["summary"], res["metrics"]
        generated = s["rollouts_generated"]
        reached = rollouts_to(m, target)
        return {"generated": generated, "zv": s["rollouts_zero_variance"] / generated,
                "wasted": s["rollouts_wasted"] / generated,
                "to_target": float(reached) if reached is not None else float("nan"),
                "final": s["eval_accuracy_after"], "steps": s["steps"],
                "screen": float(res["ledger"].get("screening") or 0)}

    table = [(name, stats(res), dt) for name, res, dt in runs]
    base = table[0][1]
    hdr = (f"{'policy':28s} {'steps':>5s} {'generated':>9s} {'zv rate':>7s} {'wasted':>6s} "
           f"{'to target':>9s} {'final':>6s} | {'zv/a':>5s} {'wst/a':>5s} {'tgt/a':>5s} "
           f"{'fin/a':>5s} {'s':>5s}")
    print(hdr)
    print("-" * len(hdr))
    for name, st, dt in table:
        def ratio(key: str, st: dict[str, float] = st) -> str:
            return f"{st[key] / base[key]:5.2f}" if base[key] else "  n/a"
        print(f"{name:28s} {st['steps']:5d} {st['generated']:9d} {st['zv']:7.3f} "
              f"{st['wasted']:6.3f} {st['to_target']:9.0f} {100 * st['final']:5.1f}% | "
              f"{ratio('zv')} {ratio('wasted')} {ratio('to_target')} {ratio('final')} {dt:5.0f}")
    for name, st, _ in table:
        if st["screen"]:
            print(f"{name}: offline screen cost {st['screen']:.0f} rollouts "
                  f"({st['screen'] / st['generated']:.2f}x of its RL rollouts), outside the budget")
    print("zv rate: zero-variance rollouts / generated; wasted: rollouts with no gradient "
          "(kept flat, dropped, discarded) / generated; to target: rollouts generated until "
          "the first in-run evaluation at the target; the ZVE run's offline screen "
          "(samples of the SFT policy before RL) is not in its generated count.")


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="ZVE benchmark: paper-regime simulation (A) and "
                                 "the tiny-task RL comparison (B)")
    ap.add_argument("--sections", default="AB", help="which sections to run (default AB)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where section B's runs go (default: a temporary folder)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if "A" in args.sections:
        section_a()
    if "B" in args.sections:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            section_b(args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="rlspec-zve-") as tmp:
                section_b(Path(tmp))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
