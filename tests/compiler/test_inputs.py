"""The user's files a spec names: a relative path is read from the spec's folder wherever the
bundle goes, and a local run's missing file is an error at validate (compiler.inputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compiler.api import compile_spec, validate
from compiler.bundle import write_bundle
from spec.errors import SpecError

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "spec.yaml"
USER_DATA = ("data.generator=null", "data.train=d/train.jsonl", "data.eval=d/eval.jsonl")


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    """The tiny spec in a folder of its own, beside its prompt files."""
    folder = tmp_path / "sp"
    (folder / "d").mkdir(parents=True)
    shutil.copy(TINY, folder / "spec.yaml")
    for split in ("train", "eval"):
        (folder / "d" / f"{split}.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return folder


def test_relative_paths_are_read_from_the_specs_folder_wherever_the_bundle_is(
        spec_dir: Path, tmp_path: Path) -> None:
    compiled = compile_spec(spec_dir / "spec.yaml", USER_DATA)
    out = write_bundle(compiled.files, tmp_path / "elsewhere" / "bundle")
    config = json.loads((out / "jobs" / "screen" / "config.json").read_text())
    expected = str((spec_dir / "d" / "train.jsonl").resolve())
    assert config["inputs"]["dataset"] == {"path": expected, "kind": "dataset", "external": True}
    assert config["spec"]["data"]["train"] == expected
    assert expected in (out / "spec.resolved.yaml").read_text()


def test_a_local_runs_missing_file_is_an_error_at_its_line(spec_dir: Path) -> None:
    (spec_dir / "d" / "eval.jsonl").unlink()
    with pytest.raises(SpecError) as err:
        validate(spec_dir / "spec.yaml", USER_DATA)
    [problem] = err.value.problems
    assert problem.path == ("data", "eval")
    assert problem.message.startswith(f"no file {(spec_dir / 'd' / 'eval.jsonl').resolve()}: "
                                      "the local run's jobs would not find it")
    assert "read from the spec's folder" in problem.suggestion


def test_a_folder_where_a_file_belongs_is_said(spec_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"no file .*/sp/d \(it is a folder\)"):
        validate(spec_dir / "spec.yaml", (*USER_DATA[:2], "data.eval=d"))


def test_a_slurm_spec_is_not_checked_against_this_machines_files() -> None:
    """The nodes' mounts (/lustre) may hold what the login node does not see."""
    validated = validate(TINY.parents[1] / "compassmax-245b.yaml")
    assert validated.source.spec.data.train == "/lustre/data/rl/train.jsonl"


def test_home_is_expanded(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(spec_dir))
    validated = validate(spec_dir / "spec.yaml", (*USER_DATA[:2], "data.eval=~/d/eval.jsonl"))
    assert validated.source.spec.data.eval == str(spec_dir / "d" / "eval.jsonl")


def test_home_in_the_output_dir_is_expanded(spec_dir: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """Quoted into env.sh, a ~ would make a folder named ~ in the bundle."""
    monkeypatch.setenv("HOME", str(spec_dir))
    compiled = compile_spec(spec_dir / "spec.yaml", ("cluster.output_dir=~/runs",))
    assert f"rlspec_default_run_dir={spec_dir}/runs/tiny" in compiled.files["env.sh"]


def test_a_slurm_input_the_container_would_not_see_is_a_warning() -> None:
    """Under none of cluster.container.mounts (nor the home pyxis mounts): the image might
    hold it, so it is said, not refused."""
    big = TINY.parents[1] / "compassmax-245b.yaml"
    [warning] = [w for w in validate(big, ("data.train=/scratch/x.jsonl",)).warnings
                 if w.path == ("data", "train")]
    assert warning.message.startswith("/scratch/x.jsonl is under none of "
                                      "cluster.container.mounts (/lustre:/lustre)")
    assert not [w for w in validate(big, (f"data.train={Path.home()}/x.jsonl",)).warnings
                if w.path == ("data", "train")]


def test_inspect_of_a_bundle_reads_the_inputs_where_its_compile_anchored_them(
        spec_dir: Path, tmp_path: Path) -> None:
    """The bundle's spec.yaml is the user's text, relative paths and all: read from the
    bundle, they would point into it (a local run's inputs then 'missing')."""
    from tests.compiler.test_cli import cli

    out = write_bundle(compile_spec(spec_dir / "spec.yaml", USER_DATA).files,
                       tmp_path / "elsewhere" / "bundle")
    result = cli("inspect", out, "--job", "screen")
    assert result.exit_code == 0, result.output
    assert str((spec_dir / "d" / "train.jsonl").resolve()) in result.stdout
