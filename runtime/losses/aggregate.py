"""How a step's metrics combine over its micro-batches, optimizer steps and ranks.

A loss reports each metric for one micro-batch; the step reports, whatever the micro-batch
size and the number of data-parallel ranks:

* counts (``n_tokens``, ``n_responses``, ``n_tokens/<group>``): per optimizer step, summed
  over its micro-batches and ranks, averaged over the optimizer steps (the correction's
  metrics are the whole batch's already);
* extremes (``*/min``, ``*/max``): the extreme over all of them (``ratio/max`` is there to
  show the train–inference outliers);
* everything else: a mean, each micro-batch weighted by its share of the loss's mean
  (tokens, or responses for a sequence-mean loss), the others (``grad_norm``, ``lr``) by
  what the trainer adds with them.

Accumulators are two dicts, ``sums`` and ``counts``: for a mean, the weighted sum and the
weights; for a count, the sum (divided by ``counts[OPTIMIZER_STEPS]`` at the end); for an
extreme, the extreme itself.
"""

from __future__ import annotations

__all__ = ["OPTIMIZER_STEPS", "add", "merge", "reduction", "result"]

OPTIMIZER_STEPS = "grad_norm"  # counted once per optimizer step (on one data-parallel rank)


def reduction(key: str) -> str:
    """``"sum"``, ``"min"``, ``"max"`` or ``"mean"`` (module doc)."""
    if key.endswith("/min"):
        return "min"
    if key.endswith("/max"):
        return "max"
    if key in ("n_tokens", "n_responses") or key.startswith("n_tokens/"):
        return "sum"
    return "mean"


def _into(sums: dict[str, float], key: str, value: float) -> None:
    """``value`` added to ``sums[key]``, or its extreme taken."""
    how = reduction(key)
    if how in ("min", "max") and key in sums:
        sums[key] = (min if how == "min" else max)(sums[key], value)
    else:
        sums[key] = sums.get(key, 0.0) + value


def add(sums: dict[str, float], counts: dict[str, float], key: str, value: float,
        weight: float) -> None:
    """One micro-batch's ``value`` of ``key`` (``weight``: its share, for a mean)."""
    if reduction(key) == "mean":
        value *= weight
        counts[key] = counts.get(key, 0.0) + weight
    _into(sums, key, value)


def merge(sums: dict[str, float], counts: dict[str, float], other_sums: dict[str, float],
          other_counts: dict[str, float]) -> None:
    """Another rank's accumulators into these."""
    for key, value in other_sums.items():
        _into(sums, key, value)
    for key, value in other_counts.items():
        counts[key] = counts.get(key, 0.0) + value


def result(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """The step's metrics from the accumulators of all its micro-batches and ranks."""
    steps = max(counts.get(OPTIMIZER_STEPS, 1.0), 1.0)
    out = {}
    for key, value in sums.items():
        how = reduction(key)
        out[key] = (value / max(counts.get(key, 0.0), 1e-12) if how == "mean"
                    else value / steps if how == "sum" else value)
    return out
