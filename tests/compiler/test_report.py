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


@pytest.mark.parametrize(("metrics", "summary", "message"), [
    ('{"step": 0}\n{"step": "x"}\n', None, r"metrics.jsonl:2: `step` must be an integer"),
    ('{"step": true}\n', None, r"metrics.jsonl:1: `step` must be an integer"),
    ('{"step": 1.5}\n', None, r"metrics.jsonl:1: `step` must be an integer"),
    (b'{"step": 0}\n\xff\xfe\n', None, r"metrics.jsonl:2: not UTF-8 text \(byte 0xff\)"),
    ('{"step": 0}\n', '{"eval', r"summary.json is damaged \(not JSON: "),
    ('{"step": 0}\n', "[]", r"summary.json is damaged \(not a JSON object\); remove it"),
])
def test_damaged_run_files_are_one_clear_error(tmp_path: Path, metrics: str | bytes,
                                               summary: str | None, message: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(metrics if isinstance(metrics, bytes) else metrics.encode())
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(ReportError, match=message):
        load_run(tmp_path)


def test_a_run_path_that_does_not_exist_or_is_a_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="nope does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReportError, match="is a file, not a run directory"):
        load_run(tmp_path / "afile")


def test_a_damaged_resolved_spec_only_loses_the_replay_label(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "r3", steps=2)
    (run / "bundle" / "spec.resolved.yaml").write_text("router_replay: [unclosed\n")
    assert load_run(run).replay == "unknown"


def test_the_report_folder_is_checked_before_writing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "r3", steps=3)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReportError, match="afile is a file, not a folder"):
        write_report([run], tmp_path / "afile")
    with pytest.raises(ReportError, match=r"cannot write the report to .*afile/sub"):
        write_report([run], tmp_path / "afile" / "sub")

    mine = tmp_path / "myreport"
    mine.mkdir()
    (mine / "report.md").write_text("# my notes\n")
    with pytest.raises(ReportError, match=r"a report\.md rlspec did not write.*--force"):
        write_report([run], mine)
    assert (mine / "report.md").read_text() == "# my notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(ReportError, match="holds other files"):
        write_report([run], tmp_path / "docs")

    write_report([run], mine, force=True)
    assert (mine / "report.md").read_text().startswith("# rlspec run report")
    (mine / "notes.txt").write_text("kept")  # a folder with an earlier report: written again
    write_report([run], mine)
    assert (mine / "notes.txt").read_text() == "kept"
    assert write_report([run]) == write_report([run]) == run / "report"  # the default, twice


def test_cli_report_refuses_a_hand_written_report_then_forces(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "r3", steps=3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("# my notes\n")
    command = [sys.executable, "-m", "compiler.main", "report", str(run), "-o",
               str(tmp_path / "mine")]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    forced = subprocess.run([*command, "--force"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "mine" / "report.md").read_text().startswith("# rlspec run report")


def test_cli_exit_code_two_and_no_traceback_for_a_bad_run_dir(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "compiler.main", "report", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no metrics.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_rolling_mean_is_trailing() -> None:
    assert rolling([1, 2, 3, 4], window=2) == [1, 1.5, 2.5, 3.5]
