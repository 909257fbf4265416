"""`rlspec report`: plots and the markdown summary from run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.report import ReportError, load_run, rolling, write_report

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, replay: str, steps: int = 30, *, summary: bool = True,
             idle: bool = False, staleness: int = 0) -> Path:
    (path / "bundle").mkdir(parents=True)
    (path / "bundle" / "spec.resolved.yaml").write_text(f"router_replay:\n  mode: '{replay}'\n")
    lines = [{"step": s, "reward_mean": s / steps, "train_accuracy": s / steps,
              "zero_variance_rate": 0.5 - s / (3 * steps), "rollouts_generated": 128,
              "rollouts_used": 100, "rollouts_reshaped": 20, "rollouts_dropped": 8,
              "reshaped_advantage_share": 0.1 if s % 2 else 0.3,
              "train_inference_gap": (1e-3 if replay == "off" else 1e-4) * (1 + s)}
             for s in range(steps)]
    if idle:  # two rollout replicas, one idle 10 %, the other 40 % of the generation time
        for line in lines:
            line["replica_idle_fraction"] = [0.1, 0.4]
    for line in lines:  # system.max_staleness: the first steps lag less
        line["staleness"] = min(int(line["step"]), staleness)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "eval_accuracy_before": 0.2, "eval_accuracy_after": 0.41,
            "rollouts_generated": 128 * steps, "rollouts_wasted": 10 * steps,
            "rollouts_reshaped": 20 * steps, "rollouts_zero_variance": 600,
            "wall_seconds": 42.0,
            "rollouts_by_staleness": {str(k): 128 * (1 if k < staleness else steps - k)
                                      for k in range(staleness + 1)}}))
    return path


def test_report_draws_every_plot_and_tabulates_each_run(tmp_path: Path) -> None:
    on = make_run(tmp_path / "replay-on", "r3")
    off = make_run(tmp_path / "replay-off", "off", steps=20, summary=False)
    folder = write_report([on, off], tmp_path / "report")
    for png in ("reward.png", "zero_variance.png", "rollouts.png", "gap.png"):
        assert (folder / png).read_bytes()[:8] == PNG, png
    md = (folder / "report.md").read_text()
    assert "| | `replay-on` | `replay-off` |" in md
    assert "| gain (points) | +21.0 | n/a |" in md
    assert "| rollouts wasted | 300 (7.8%) | n/a |" in md
    # reshaped rollouts: their own row, from the summary or else summed over the steps
    assert "| rollouts reshaped (RL-ZVP) | 600 (15.6%) | 400 (15.6%) |" in md
    assert "| RL-ZVP share of the advantage mass (mean per step) | 20.0% | 20.0% |" in md
    assert "| router replay | r3 | off |" in md
    assert "| RL steps logged | 30 | 20 |" in md
    assert "still in progress" in md  # the second run has no summary.json yet
    assert not list(folder.glob(".*.tmp"))


def test_replica_idle_time_is_plotted_where_a_run_logged_it(tmp_path: Path) -> None:
    from compiler.report import idle_series

    plain = make_run(tmp_path / "plain", "off")
    folder = write_report([plain], tmp_path / "without")
    assert not (folder / "replica_idle.png").exists()
    assert "replica_idle.png" not in (folder / "report.md").read_text()

    balanced = make_run(tmp_path / "balanced", "off", steps=5, idle=True)
    assert idle_series(load_run(balanced)) == ([1, 2, 3, 4, 5], [0.25] * 5, [0.4] * 5)
    folder = write_report([plain, balanced], tmp_path / "with")
    assert (folder / "replica_idle.png").read_bytes()[:8] == PNG
    assert "## Rollout replica idle time" in (folder / "report.md").read_text()


def test_staleness_is_plotted_and_counted_where_rollouts_lagged(tmp_path: Path) -> None:
    on_policy = make_run(tmp_path / "sync", "off", steps=5)
    folder = write_report([on_policy], tmp_path / "without")
    assert not (folder / "staleness.png").exists()
    assert "| rollouts by staleness | 0: 640 |" in (folder / "report.md").read_text()

    lagging = make_run(tmp_path / "async", "off", steps=5, staleness=2)
    folder = write_report([on_policy, lagging], tmp_path / "with")
    assert (folder / "staleness.png").read_bytes()[:8] == PNG
    md = (folder / "report.md").read_text()
    assert "## Rollout staleness" in md
    assert "| rollouts by staleness | 0: 640 | 0: 128, 1: 128, 2: 384 |" in md


def test_colocated_runs_show_the_engines_sleep_and_wake_time(tmp_path: Path) -> None:
    plain = make_run(tmp_path / "disaggregated", "off", steps=4)
    colocated = make_run(tmp_path / "colocated", "off", steps=4)
    lines = [json.loads(x) for x in (colocated / "metrics.jsonl").read_text().splitlines()]
    for line, seconds in zip(lines, (0.5, 0.25, 0.25, 0.5), strict=True):
        line["sleep_wake_seconds"] = seconds
    (colocated / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    md = (write_report([plain, colocated], tmp_path / "report") / "report.md").read_text()
    assert "| engine sleep + wake-up per step (colocated) | n/a | 0.38 s |" in md


def test_a_live_run_is_read_from_the_rl_job_artifacts(tmp_path: Path) -> None:
    run = make_run(tmp_path / "live", "r3", summary=False)
    live = run / "artifacts" / "rl"
    live.mkdir(parents=True)
    (run / "metrics.jsonl").rename(live / "metrics.jsonl")
    assert len(load_run(run).metrics) == 30


@pytest.mark.parametrize(("content", "message"), [
    (None, "no metrics.jsonl"),
    ("", "no steps logged yet"),
    ('{"step": 0}\n{"step": 1\n', r"metrics.jsonl:2: not JSON"),
    ('{"reward_mean": 1}\n', r"metrics.jsonl:1: a metrics line needs a `step`"),
])
def test_unreadable_runs_are_one_clear_error(tmp_path: Path, content: str | None,
                                             message: str) -> None:
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        load_run(tmp_path)


def test_cli_exit_code_two_and_no_traceback_for_a_bad_run_dir(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "compiler.main", "report", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no metrics.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_rolling_mean_is_trailing() -> None:
    assert rolling([1, 2, 3, 4], window=2) == [1, 1.5, 2.5, 3.5]
