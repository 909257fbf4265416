"""`rlspec report RUN_DIR...`: PNG plots and a markdown summary of finished (or running) runs.

A run directory is what `rlspec run --out DIR` leaves behind: ``metrics.jsonl`` (one line per
RL step) and ``summary.json``; while a run is in progress the RL job's live
``artifacts/rl/metrics.jsonl`` is read instead. Several runs are drawn on the same axes,
labelled ``<dir name> (replay <mode>)``, so that a run with router replay and one without it
give the train–inference gap plot its two curves.

Files written to ``--out`` (default ``<first run>/report``), each replaced atomically:

    reward.png          reward mean and train accuracy per step (20-step rolling mean),
                        in-run held-out accuracy (``eval.every_steps``) and held-out
                        accuracy before/after RL as dashed levels
    zero_variance.png   share of prompt groups whose rewards were all equal, per step
    rollouts.png        cumulative rollouts: generated, used for gradient, reshaped, dropped
    gap.png             mean |log π_train − log μ_rollout| per step, per replay mode
    replica_idle.png    the rollout replicas' idle share of each step's generation time,
                        mean and largest over the replicas (only when a run logged
                        ``replica_idle_fraction``)
    staleness.png       each step's staleness: how many policy versions its rollouts lag the
                        weights they train (only when a run logged a staleness above 0,
                        ``system.max_staleness``)
    report.md           the summary table of every run and the plots; the table counts
                        rollouts wasted (no gradient) and rollouts reshaped by RL-ZVP (a
                        class of their own: trained on, but from flat groups) apart, with
                        the mean share of a step's Σ|advantage| the RL-ZVP groups carry,
                        and (colocated placement) the engines' mean sleep + wake-up time
                        per step
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOOTH = 20  # steps in the rolling mean of noisy per-step series
HEADING = "# rlspec run report"  # report.md's first line: how a report folder is known


class ReportError(Exception):
    """A run directory that cannot be reported on (exit code 2)."""


@dataclass
class Run:
    """One run directory's metrics (a list of per-step dicts) and summary."""

    path: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    replay: str = "unknown"

    @property
    def label(self) -> str:
        return f"{self.path.name} (replay {self.replay})"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key``, skipping steps where it is missing or null."""
        xs, ys = [], []
        for line in self.metrics:
            value = line.get(key)
            if isinstance(value, (int, float)):
                xs.append(int(line["step"]) + 1)
                ys.append(float(value))
        return xs, ys


def load_run(path: Path) -> Run:
    """Read a run directory; a missing or unreadable ``metrics.jsonl`` is a ReportError."""
    if not path.exists():
        raise ReportError(f"{path} does not exist; give a run directory (`rlspec run --out DIR`)")
    if not path.is_dir():
        raise ReportError(f"{path} is a file, not a run directory (`rlspec run --out DIR`)")
    path = path.resolve()
    candidates = [path / "metrics.jsonl", path / "artifacts" / "rl" / "metrics.jsonl"]
    metrics_path = next((p for p in candidates if p.is_file()), None)
    if metrics_path is None:
        raise ReportError(f"{path}: no metrics.jsonl (looked in {candidates[0]} and "
                          f"{candidates[1]}); is it the --out directory of `rlspec run`?")
    metrics = []
    for number, text in enumerate(_text(metrics_path).splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{metrics_path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(line, dict) or "step" not in line:
            raise ReportError(f"{metrics_path}:{number}: a metrics line needs a `step`")
        step = line["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ReportError(f"{metrics_path}:{number}: `step` must be an integer ≥ 0, "
                              f"not {step!r}; fix or remove that line")
        metrics.append(line)
    if not metrics:
        raise ReportError(f"{metrics_path}: no steps logged yet")
    summary_path = path / "summary.json"
    summary = _summary(summary_path) if summary_path.is_file() else {}
    return Run(path, metrics, summary, _replay_mode(path))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ReportError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                          "is it a metrics file `rlspec run` wrote?") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror})") from None


def _summary(path: Path) -> dict[str, Any]:
    """A run's summary.json: a damaged one is an error (remove it to report the metrics)."""
    try:
        summary = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        summary = str(exc)
    if not isinstance(summary, dict):
        detail = f"not JSON: {summary}" if isinstance(summary, str) else "not a JSON object"
        raise ReportError(f"{path} is damaged ({detail}); remove it to report from the "
                          "metrics alone (`rlspec run` writes it again when the run ends)")
    return summary


def _replay_mode(path: Path) -> str:
    """The run's ``router_replay.mode`` from the resolved spec in its bundle."""
    import yaml

    resolved = path / "bundle" / "spec.resolved.yaml"
    try:
        spec = yaml.safe_load(resolved.read_text(encoding="utf-8"))
        mode = spec["router_replay"]["mode"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return "unknown"  # no bundle, or a resolved spec that does not say: only a label
    return "off" if mode is False else str(mode)  # YAML 1.1 reads a bare `off` as false


def rolling(values: Sequence[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average fewer)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def cumulative(run: Run, key: str) -> tuple[list[int], list[float]]:
    xs, ys, total = [], [], 0.0
    for line in run.metrics:
        total += float(line.get(key) or 0)
        xs.append(int(line["step"]) + 1)
        ys.append(total)
    return xs, ys


# --------------------------------------------------------------------------- plots


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_reward(runs: Sequence[Run], path: Path) -> None:
    fig, ax = _figure("Reward and accuracy", "mean per step")
    for i, run in enumerate(runs):
        color = f"C{i}"
        for key, style, name in (("reward_mean", "-", "reward"),
                                 ("train_accuracy", ":", "train accuracy")):
            xs, ys = run.series(key)
            if xs:
                ax.plot(xs, rolling(ys), style, color=color, label=f"{name}, {run.label}")
        xs, ys = run.series("eval_accuracy")  # in-run held-out evaluation (eval.every_steps)
        if xs:
            ax.plot(xs, ys, "o-", color=color, ms=3, label=f"held-out accuracy, {run.label}")
        for when, alpha in (("before", 0.5), ("after", 1.0)):
            value = run.summary.get(f"eval_accuracy_{when}")
            if isinstance(value, (int, float)):
                ax.axhline(value, ls="--", color=color, alpha=alpha,
                           label=f"held-out accuracy {when} RL ({100 * value:.1f}%)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_zero_variance(runs: Sequence[Run], path: Path) -> None:
    fig, ax = _figure("Zero-variance groups", "share of groups (rolling mean)")
    for i, run in enumerate(runs):
        xs, ys = run.series("zero_variance_rate")
        if xs:
            ax.plot(xs, rolling(ys), color=f"C{i}", label=run.label)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, path)


ROLLOUT_KEYS = (("rollouts_generated", "generated"), ("rollouts_used", "used for gradient"),
                ("rollouts_reshaped", "reshaped (RL-ZVP)"), ("rollouts_dropped", "dropped"))


def plot_rollouts(runs: Sequence[Run], path: Path) -> None:
    fig, ax = _figure("Rollout accounting", "rollouts (cumulative)")
    styles = ("-", "--", "-.", ":")
    for i, run in enumerate(runs):
        for (key, name), style in zip(ROLLOUT_KEYS, styles, strict=True):
            xs, ys = cumulative(run, key)
            ax.plot(xs, ys, style, color=f"C{i}", label=f"{name}, {run.label}")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_gap(runs: Sequence[Run], path: Path) -> None:
    fig, ax = _figure("Train–inference log-prob gap", "mean |log π − log μ| per token")
    drawn = False
    for i, run in enumerate(runs):
        xs, ys = run.series("train_inference_gap")
        if xs:
            ax.plot(xs, ys, color=f"C{i}", label=run.label)
            drawn = True
    if drawn and all(y > 0 for run in runs for y in run.series("train_inference_gap")[1]):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    _save(fig, path)


def idle_series(run: Run) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, max) over the replicas of ``replica_idle_fraction``, where logged."""
    xs, means, peaks = [], [], []
    for line in run.metrics:
        values = line.get("replica_idle_fraction")
        if isinstance(values, list) and values:
            xs.append(int(line["step"]) + 1)
            means.append(sum(values) / len(values))
            peaks.append(max(values))
    return xs, means, peaks


def plot_replica_idle(runs: Sequence[Run], path: Path) -> None:
    fig, ax = _figure("Rollout replica idle time", "share of the step's generation time")
    for i, run in enumerate(runs):
        xs, means, peaks = idle_series(run)
        if xs:
            ax.plot(xs, means, "-", color=f"C{i}", label=f"mean over replicas, {run.label}")
            ax.plot(xs, peaks, "--", color=f"C{i}", label=f"most idle replica, {run.label}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, path)


def stale(run: Run) -> bool:
    """Whether some step of ``run`` was sampled by older weights than it trained."""
    return any(y > 0 for y in run.series("staleness")[1])


def plot_staleness(runs: Sequence[Run], path: Path) -> None:
    fig, ax = _figure("Rollout staleness", "policy versions behind the trainer")
    for i, run in enumerate(runs):
        xs, ys = run.series("staleness")
        if xs:
            ax.step(xs, ys, where="mid", color=f"C{i}", label=run.label)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    _save(fig, path)


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, kind: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "s":
        return f"{value:.0f} s"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def _share(count: Any, generated: int) -> str:
    """``count`` and its share of the generated rollouts."""
    return _fmt(count) + (f" ({100 * count / generated:.1f}%)"
                          if isinstance(count, int) and generated else "")


def summary_rows(run: Run) -> list[tuple[str, str]]:
    s = run.summary
    generated = s.get("rollouts_generated") or sum(
        int(m.get("rollouts_generated") or 0) for m in run.metrics)
    wasted = s.get("rollouts_wasted")
    reshaped = s.get("rollouts_reshaped")
    if reshaped is None and run.metrics and "rollouts_reshaped" in run.metrics[0]:
        reshaped = sum(int(m.get("rollouts_reshaped") or 0) for m in run.metrics)
    shares = [m["reshaped_advantage_share"] for m in run.metrics
              if isinstance(m.get("reshaped_advantage_share"), (int, float))]
    zvp_share = sum(shares) / len(shares) if shares else None
    norms = [m["reshaped_grad_norm_share"] for m in run.metrics
             if isinstance(m.get("reshaped_grad_norm_share"), (int, float))]
    zvp_norm = sum(norms) / len(norms) if norms else None
    before, after = s.get("eval_accuracy_before"), s.get("eval_accuracy_after")
    gain = (after - before) if isinstance(before, (int, float)) and isinstance(
        after, (int, float)) else None
    last = run.metrics[-1]
    # colocated placement: the engines' sleep + wake-up time around each trainer step
    sleep_wake = [m["sleep_wake_seconds"] for m in run.metrics
                  if isinstance(m.get("sleep_wake_seconds"), (int, float))]
    return [
        ("RL steps logged", _fmt(int(last["step"]) + 1)),
        ("held-out accuracy before RL", _fmt(before, "pct")),
        ("held-out accuracy after RL", _fmt(after, "pct")),
        ("gain (points)", "n/a" if gain is None else f"{100 * gain:+.1f}"),
        ("rollouts generated", _fmt(int(generated))),
        ("rollouts wasted", _share(wasted, generated)),
        ("rollouts reshaped (RL-ZVP)", _share(reshaped, generated)),
        ("RL-ZVP share of the advantage mass (mean per step)", _fmt(zvp_share, "pct")),
        ("RL-ZVP gradient norm / the update's (mean per step)", _fmt(zvp_norm)),
        ("zero-variance rollouts", _fmt(s.get("rollouts_zero_variance"))),
        ("router replay", run.replay),
        ("rollouts by staleness", ", ".join(
            f"{k}: {v:,}" for k, v in (s.get("rollouts_by_staleness") or {}).items()) or "n/a"),
        ("engine sleep + wake-up per step (colocated)",
         f"{sum(sleep_wake) / len(sleep_wake):.2f} s" if sleep_wake else "n/a"),
        ("RL wall time", _fmt(s.get("wall_seconds"), "s")),
    ]


PLOTS = (("reward.png", plot_reward, "Reward and accuracy"),
         ("zero_variance.png", plot_zero_variance, "Zero-variance groups"),
         ("rollouts.png", plot_rollouts, "Rollout accounting"),
         ("gap.png", plot_gap, "Train–inference gap"))
IDLE_PLOT = ("replica_idle.png", plot_replica_idle, "Rollout replica idle time")
STALENESS_PLOT = ("staleness.png", plot_staleness, "Rollout staleness")


def plots(runs: Sequence[Run]) -> tuple[tuple[str, Any, str], ...]:
    """The plots of these runs: every one of ``PLOTS``, the replica idle time when a run
    logged it, and the staleness when a run's rollouts lagged."""
    return (PLOTS + ((IDLE_PLOT,) if any(idle_series(r)[0] for r in runs) else ())
            + ((STALENESS_PLOT,) if any(stale(r) for r in runs) else ()))


def markdown(runs: Sequence[Run]) -> str:
    rows = [summary_rows(r) for r in runs]
    lines = [HEADING, ""]
    if not all(r.summary for r in runs):
        lines += ["Runs without `summary.json` are still in progress or stopped early: "
                  "their figures are from the steps logged so far.", ""]
    lines.append("| | " + " | ".join(f"`{r.path.name}`" for r in runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for i, (name, _) in enumerate(rows[0]):
        lines.append(f"| {name} | " + " | ".join(row[i][1] for row in rows) + " |")
    lines.append("")
    for file, _, title in plots(runs):
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return "\n".join(lines)


def _check_folder(out: Path, force: bool) -> None:
    """Refuse a folder that is a file, or one holding something other than an earlier
    report (its own report.md, say) unless ``force``: a report replaces only its files."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} is a file, not a folder; choose another --out")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    previous = out / "report.md"
    try:
        ours = previous.is_file() and previous.read_text(encoding="utf-8").startswith(HEADING)
    except (OSError, ValueError):
        ours = False
    if not ours:
        what = "a report.md rlspec did not write" if previous.exists() else "other files"
        raise ReportError(f"{out} holds {what}; choose another --out, or pass --force to "
                          "write the report there (its report.md and plots are replaced)")


def write_report(run_dirs: Sequence[Path], out: Path | None = None, *,
                 force: bool = False) -> Path:
    """Load every run, draw the plots and write ``report.md``; returns the report folder."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    out = (out or runs[0].path / "report").resolve()
    _check_folder(out, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for file, draw, _ in plots(runs):
            draw(runs, out / file)
        tmp = out / ".report.md.tmp"
        tmp.write_text(markdown(runs), encoding="utf-8")
        os.replace(tmp, out / "report.md")
    except OSError as exc:
        raise ReportError(f"cannot write the report to {out}: {exc.strerror} "
                          f"({exc.filename}); choose another --out") from None
    return out
