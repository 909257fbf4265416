"""docker/Dockerfile, the cluster's runtime image, agrees with the pins it installs.

The image is not built by the tests (CUDA, vLLM: many GB). What can drift is checked here:
its vLLM is the Makefile's (the version whose `vllm serve` flags tests/vllm_flags checks),
its torch and megatron-core satisfy pyproject.toml's `runtime` extra, and it copies every
package pyproject.toml ships.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _arg(name: str) -> str:
    found = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE, flags=re.M)
    assert len(found) == 1, f"docker/Dockerfile: ARG {name} (found {found})"
    return found[0]


def _requirement(extra: str, name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return next(r for r in reqs if r.name == name)


def test_vllm_is_the_pinned_one() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pinned = re.search(r"^VLLM_VERSION := (\S+)$", makefile, flags=re.M).group(1)
    table = json.loads((ROOT / "tests" / "vllm_flags" / "vllm_serve_options.json").read_text())
    assert _arg("VLLM_VERSION") == pinned == table["vllm_version"]
    assert 'pip install "vllm==${VLLM_VERSION}"' in DOCKERFILE


def test_torch_and_megatron_core_satisfy_the_runtime_extra() -> None:
    for name, arg in (("torch", "TORCH_VERSION"), ("megatron-core", "MEGATRON_CORE_VERSION")):
        version = _arg(arg)
        assert _requirement("runtime", name).specifier.contains(version), (name, version)
    assert _arg("MEGATRON_CORE_VERSION") == "0.16.1"  # what runtime/megatron is written for
    assert '"/src/rlspec[runtime]"' in DOCKERFILE
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", DOCKERFILE, flags=re.M)
    assert _arg("CUDA_IMAGE").startswith("nvidia/cuda:")


def test_every_shipped_package_is_copied() -> None:
    shipped = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) /src/rlspec/\1$", DOCKERFILE, flags=re.M))
    assert copied == shipped
    assert "COPY pyproject.toml README.md /src/rlspec/" in DOCKERFILE
