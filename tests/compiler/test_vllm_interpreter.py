"""Which interpreter starts vLLM (lib.sh: ``rlspec_vllm_python``, run where the engines start):
the runtime image keeps vLLM in its own environment, so the runtime's ``python3`` is not it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compiler.api import compile_spec
from compiler.bundle import write_bundle

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "spec.yaml"


@pytest.fixture(scope="module")
def lib_sh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiled = compile_spec(TINY, ("rollout.engine=vllm",))
    return write_bundle(compiled.files, tmp_path_factory.mktemp("b") / "bundle") / "lib.sh"


def resolve(lib_sh: Path, tmp_path: Path, env: dict[str, str], vllm_shebang: str | None = None,
            has_vllm: bool = True) -> subprocess.CompletedProcess[str]:
    """``rlspec_vllm_python`` with ``env``; a ``vllm`` command on PATH with ``vllm_shebang``;
    a ``vllm`` package importable (by every interpreter) when ``has_vllm``."""
    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    if vllm_shebang is not None:
        (bin_dir / "vllm").write_text(f"#!{vllm_shebang}\nimport sys\n")
        (bin_dir / "vllm").chmod(0o755)
    (bin_dir / "runtime-python").symlink_to(sys.executable)
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", **env}
    if has_vllm:
        full["PYTHONPATH"] = str(site)
    return subprocess.run(["bash", "-c", f'source "{lib_sh}" && rlspec_vllm_python'],
                          env=full, capture_output=True, text=True, timeout=60)


def test_the_variable_wins(lib_sh: Path, tmp_path: Path) -> None:
    out = resolve(lib_sh, tmp_path, {"RLSPEC_VLLM_PYTHON": sys.executable,
                                     "RLSPEC_PYTHON": "/nonexistent"}, vllm_shebang="/other/py")
    assert out.returncode == 0 and out.stdout.strip() == sys.executable


@pytest.mark.parametrize("shebang", ["abs", "env"])
def test_else_the_interpreter_of_the_vllm_command(lib_sh: Path, tmp_path: Path,
                                                  shebang: str) -> None:
    """As in the runtime image: /opt/vllm/bin/vllm's shebang names /opt/vllm/bin/python3."""
    line = sys.executable if shebang == "abs" else "/usr/bin/env runtime-python"
    out = resolve(lib_sh, tmp_path, {"RLSPEC_PYTHON": "/nonexistent"}, vllm_shebang=line)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (sys.executable if shebang == "abs" else "runtime-python")


def test_else_the_runtime_interpreter(lib_sh: Path, tmp_path: Path) -> None:
    out = resolve(lib_sh, tmp_path, {"RLSPEC_PYTHON": sys.executable})
    assert out.returncode == 0 and out.stdout.strip() == sys.executable


def test_an_interpreter_without_vllm_is_refused_with_the_way_out(lib_sh: Path,
                                                                 tmp_path: Path) -> None:
    out = resolve(lib_sh, tmp_path, {"RLSPEC_PYTHON": sys.executable}, has_vllm=False)
    assert out.returncode == 2 and out.stdout == ""
    assert f"no vllm package in {sys.executable}" in out.stderr
    assert "set RLSPEC_VLLM_PYTHON" in out.stderr


def test_pips_trampoline_for_a_spaced_path_is_read(lib_sh: Path, tmp_path: Path) -> None:
    """pip writes `#!/bin/sh` and an exec line when the venv's path has a space or is long."""
    spaced = tmp_path / "my venv"
    spaced.mkdir()
    (spaced / "python").symlink_to(sys.executable)
    quotes = "'" * 3
    trampoline = f'/bin/sh\n{quotes}exec\' "{spaced}/python" "$0" "$@"\n\' {quotes}'
    out = resolve(lib_sh, tmp_path, {"RLSPEC_PYTHON": "/nonexistent"}, vllm_shebang=trampoline)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{spaced}/python"


def test_a_vllm_command_without_the_package_falls_back_to_the_runtime(
        lib_sh: Path, tmp_path: Path) -> None:
    wrapper = tmp_path / "wrapper-python"
    wrapper.write_text("#!/bin/sh\nexit 1\n")  # a wrapper of some other python
    wrapper.chmod(0o755)
    out = resolve(lib_sh, tmp_path, {"RLSPEC_PYTHON": sys.executable},
                  vllm_shebang=str(wrapper))
    assert out.returncode == 0 and out.stdout.strip() == sys.executable, out.stderr
