"""Statistics of the benches over seeds: quantiles that allow ∞ and percentile-bootstrap
intervals of the median."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP = 10_000  # resamples of the seeds, fixed generator


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile without interpolation (∞ allowed: a run that never reached its target)."""
    return float(np.quantile(np.asarray(values, dtype=float), q, method="inverted_cdf"))


def median_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Median and its 95 % percentile-bootstrap interval over the given per-seed values."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = [quantile(x[rng.integers(0, len(x), len(x))], 0.5) for _ in range(BOOTSTRAP)]
    return quantile(x, 0.5), quantile(boots, 0.025), quantile(boots, 0.975)


def fmt_ci(m: tuple[float, float, float], scale: float = 1.0, digits: int = 2) -> str:
    def one(v: float) -> str:
        return "∞" if math.isinf(v) else ("nan" if math.isnan(v) else f"{v * scale:.{digits}f}")
    return f"{one(m[0])} ({one(m[1])}–{one(m[2])})"
