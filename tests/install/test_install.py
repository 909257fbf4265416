"""The login-node install: `pip install rlspec` (the core, no extra) in a fresh virtual
environment, without torch, validates every example and compiles one.

It installs from a copy of the packaged files (pyproject.toml, README.md and the four
packages), so the source tree stays clean and the wheel's contents are what is tested: a
template left out of the package data fails here. Dependencies come from the package index
(pip's cache makes a rerun take about 10 s); `-m 'not install'` leaves the test out offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml"))
PACKAGED = ("pyproject.toml", "README.md", "spec", "compiler", "runtime", "templates")

pytestmark = pytest.mark.install


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 300,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, encoding="utf-8")
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_core_install_validates_every_example_without_torch(tmp_path: Path) -> None:
    assert EXAMPLES, "no examples found"
    src = tmp_path / "src"
    for name in PACKAGED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    # Nothing of this checkout may leak in: no PYTHONPATH, and a working directory outside it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RLSPEC_PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, rlspec = venv / "bin" / "python", venv / "bin" / "rlspec"
    _run([python, "-m", "pip", "install", "-q", src], tmp_path, env)

    # The core install carries no runtime package.
    probe = ("import importlib.util as u; "
             "print(*[m for m in ('torch', 'numpy', 'transformers', 'megatron', 'matplotlib') "
             "if u.find_spec(m)])")
    assert _run([python, "-c", probe], tmp_path, env).stdout.split() == []
    where = _run([python, "-c", "import compiler; print(compiler.__file__)"], tmp_path, env)
    assert str(venv) in where.stdout, where.stdout  # the installed copy, not this checkout

    for example in EXAMPLES:
        out = _run([rlspec, "validate", example], tmp_path, env, timeout=60)
        assert "valid" in out.stdout, out.stdout

    bundle = tmp_path / "bundle"
    _run([rlspec, "compile", ROOT / "examples" / "compassmax-245b.yaml", "-o", bundle],
         tmp_path, env, timeout=60)
    _run([rlspec, "check", bundle], tmp_path, env, timeout=60)
    _run([rlspec, "submit", bundle, "--dry-run"], tmp_path, env, timeout=60)

    # What needs an extra says which one.
    run = _run([rlspec, "run", ROOT / "examples" / "tiny" / "spec.yaml", "--out", tmp_path / "r"],
               tmp_path, env, timeout=60, check=False)
    assert run.returncode == 1, run.stderr
    assert "pip install 'rlspec[runtime]'" in run.stderr and "torch" in run.stderr, run.stderr
    assert not (tmp_path / "r").exists()
