"""The libraries whose API the jobs rely on, in the versions that API has; checked at job start.

A cluster container holds whatever its builder installed. A transformers outside the range
below does not fail loudly: 5.17 ignores the embedded engine's ``cache=`` argument and its
log-probs come out 0.38 off a full forward; megatron-core outside 0.16 breaks the patches of
``runtime.megatron.cpu``. So every job compares the installed versions with these ranges
before it starts (``runtime.preflight.preflight_context``). pyproject.toml's ``runtime`` extra
pins the same ranges (tests/runtime/test_versions.py holds the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["PINS", "version_problems"]

# distribution → (the range whose API the code uses, what breaks outside it)
PINS: dict[str, tuple[str, str]] = {
    "transformers": (">=5.25,<6", "the embedded engine's KV cache (`cache=`): 5.17 ignores it "
                                  "and its log-probs are 0.38 off a full forward"),
    "megatron-core": (">=0.16.1,<0.17", "runtime/megatron patches 0.16.1's internals (CPU "
                                        "dispatch, te_general_gemm, routing replay)"),
    "torch": (">=2.6,<3", "megatron-core 0.16.1 needs torch ≥ 2.6"),
}


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problems(installed: Callable[[str], str | None] = _installed) -> list[str]:
    """One line per installed library outside its range (a missing one is the importer's)."""
    problems = []
    for name, (spec, why) in PINS.items():
        found = installed(name)
        if found is not None and Version(found) not in SpecifierSet(spec):
            problems.append(f"{name} {found} is installed, the runtime needs {name}{spec}: "
                            f"{why}; install `{name}{spec}` in the job's environment")
    return problems
