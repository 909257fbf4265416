"""The library versions the jobs check at start are the ones pyproject.toml pins."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from runtime.versions import PINS, version_problems

ROOT = Path(__file__).resolve().parents[2]


def test_the_runtime_pins_are_pyprojects() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["runtime"]
    pinned = {r.name: str(r.specifier) for r in map(Requirement, extra)}
    for name, (spec, _) in PINS.items():
        assert str(Requirement(f"{name}{spec}").specifier) == pinned[name], name


def test_the_installed_libraries_are_in_range() -> None:
    assert version_problems() == []


def test_a_transformers_whose_cache_api_differs_is_refused() -> None:
    versions = {"transformers": "5.17.0", "megatron-core": "0.16.1", "torch": "2.13.0"}
    problems = version_problems(versions.get)
    assert len(problems) == 1
    assert problems[0].startswith("transformers 5.17.0 is installed, the runtime needs "
                                  "transformers>=5.25,<6: the embedded engine's KV cache")
    newer = {**versions, "transformers": "5.25.0", "megatron-core": "0.17.0"}
    assert [p.split(" is ")[0] for p in version_problems(newer.get)] == ["megatron-core 0.17.0"]
    assert version_problems({"torch": "2.13.0"}.get) == []  # not installed: not this check's
