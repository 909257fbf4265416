"""CPU micro-benchmarks of the runtime.

Run: ``.venv/bin/python bench/losses.py``

The script is a list of sections (``SECTIONS``): each is ``(name, measure, show)`` where
``measure() -> dict`` returns its results and ``show(dict)`` prints them; ``main()`` runs
them in order and returns ``{name: results}``. Add a section by appending to ``SECTIONS``.

Section "losses" times forward + backward of ESPO against GRPO on the same batch (B=64,
T=4096, varied response lengths), interleaving the two (and ESPO's entropy grouping alone,
as context) so that drifts of the machine hit all alike, and reports the ratio ESPO/GRPO
of the medians (goal ≤ 1.3×). Absolute times are printed only as context: they depend on
the machine and its load, the ratio much less.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.losses import espo_high_entropy_mask, espo_loss, grpo_loss

ESPO_GOAL = 1.3


def _make_batch(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full-length response
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old_logp = -torch.rand(B, T, generator=g) * 3.0
    logp = (old_logp + 0.05 * torch.randn(B, T, generator=g)).requires_grad_()
    entropy = torch.rand(B, T, generator=g) * 4.0
    advantages = torch.randn(B, generator=g)
    return {
        "logp": logp,
        "old_logp": old_logp,
        "mask": mask,
        "entropy": entropy,
        "advantages": advantages,
    }


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_losses(B: int = 64, T: int = 4096, reps: int = 21, warmup: int = 3) -> dict:
    """Forward+backward time of ESPO vs GRPO on one batch, interleaved, as a ratio.

    Each repetition times GRPO, ESPO and ESPO's entropy grouping alone, in an order that
    rotates between repetitions. The ratio is that of the medians; the median of the
    per-repetition ratios is reported as a check.
    """
    x = _make_batch(B, T)
    lp = x["logp"]

    def grpo() -> None:
        lp.grad = None
        grpo_loss(lp, x["old_logp"], x["advantages"], x["mask"]).loss.backward()

    def espo() -> None:
        lp.grad = None
        espo_loss(
            lp, x["old_logp"], x["advantages"], x["mask"], x["entropy"], vocab_size=151_936
        ).loss.backward()

    def grouping() -> None:
        espo_high_entropy_mask(x["entropy"], x["mask"], 0.2)

    cases = {"grpo": grpo, "espo": espo, "espo_grouping": grouping}
    names = list(cases)
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    pair_ratios: list[float] = []
    for i in range(reps):
        order = names[i % len(names) :] + names[: i % len(names)]
        rep = {k: _timed(cases[k]) for k in order}
        for k, v in rep.items():
            times[k].append(v)
        pair_ratios.append(rep["espo"] / rep["grpo"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "B": B,
        "T": T,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "grpo_ms": 1e3 * med["grpo"],
        "espo_ms": 1e3 * med["espo"],
        "espo_grouping_ms": 1e3 * med["espo_grouping"],
        "ratio_espo_grpo": med["espo"] / med["grpo"],
        "ratio_espo_grpo_median_of_reps": statistics.median(pair_ratios),
        "ratio_grouping_grpo": med["espo_grouping"] / med["grpo"],
        "goal": ESPO_GOAL,
    }


def show_losses(r: dict) -> None:
    ok = "OK" if r["ratio_espo_grpo"] <= r["goal"] else "ABOVE GOAL"
    print(f"  ESPO/GRPO forward+backward: {r['ratio_espo_grpo']:.2f}x (goal ≤ {r['goal']}x) {ok}")
    print(f"  median of per-repetition ratios: {r['ratio_espo_grpo_median_of_reps']:.2f}x")
    print(f"  ESPO's entropy grouping alone / GRPO: {r['ratio_grouping_grpo']:.2f}x")
    print(
        f"  context: B={r['B']} T={r['T']} reps={r['reps']} threads={r['threads']}; medians "
        f"GRPO {r['grpo_ms']:.2f} ms, ESPO {r['espo_ms']:.2f} ms "
        f"(of which grouping {r['espo_grouping_ms']:.2f} ms)"
    )


#: (name, measure, show) -- later sections (e.g. router replay) are appended here.
SECTIONS: list[tuple[str, Callable[[], dict], Callable[[dict], None]]] = [
    ("losses", measure_losses, show_losses),
]


def main() -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name, measure, show in SECTIONS:
        print(f"[{name}]")
        results[name] = measure()
        show(results[name])
    return results


if __name__ == "__main__":
    main()
