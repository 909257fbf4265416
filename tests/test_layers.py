"""The house's import rules, read from the code (every import, function-level ones too):
`compiler/` never imports torch, `runtime/` never imports `compiler`, and a runtime module
imports only from its own layer or the layers below, as the README's layer table lists them
(which must name every top-level runtime module)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "megatron", "vllm", "safetensors", "numpy")


def imports(folder: str) -> Iterator[tuple[Path, str]]:
    """(file, absolute module name) of every import under ``folder``."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module
            elif isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)


def readme_layers() -> list[tuple[str, list[str]]]:
    """(layer, its top-level runtime modules) from the README's table, bottom layer first."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme[readme.index("| layer | modules |"):].splitlines()[2:]
    layers = []
    for line in lines:
        if not line.startswith("|"):
            break
        layer, modules = (cell.strip() for cell in line.strip("|").split("|", 1))
        named = [m.rstrip("/").removesuffix(".py") for m in re.findall(r"`([^`]+)`", modules)
                 if m.endswith((".py", "/")) and (ROOT / "runtime" / m.rstrip("/")).exists()]
        layers.append((layer, named))
    return layers


@pytest.mark.parametrize("folder", ["compiler", "spec"])
def test_the_compiler_and_the_spec_import_no_runtime_library(folder: str) -> None:
    """They run on the login node, where `pip install rlspec` installs none of these."""
    found = [(p.relative_to(ROOT), m) for p, m in imports(folder) if m.split(".")[0] in HEAVY]
    assert found == []


def test_the_runtime_never_imports_the_compiler() -> None:
    found = [(p.relative_to(ROOT), m) for p, m in imports("runtime")
             if m.split(".")[0] == "compiler"]
    assert found == []


def test_a_runtime_module_imports_no_higher_layer() -> None:
    layers = readme_layers()
    layer_of = {module: i for i, (_, modules) in enumerate(layers) for module in modules}
    top = {p.stem if p.is_file() else p.name for p in (ROOT / "runtime").iterdir()
           if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert sorted(top - set(layer_of)) == [], "runtime modules the README's layer table misses"
    upward = []
    for path, module in imports("runtime"):
        mine = path.relative_to(ROOT / "runtime").parts[0].removesuffix(".py")
        theirs = module.split(".")[1] if module.startswith("runtime.") else None
        if mine in layer_of and theirs in layer_of and layer_of[theirs] > layer_of[mine]:
            upward.append(f"{path.relative_to(ROOT)} ({layers[layer_of[mine]][0]}) imports "
                          f"{module} ({layers[layer_of[theirs]][0]})")
    assert upward == []
