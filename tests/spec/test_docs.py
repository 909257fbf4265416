"""docs/spec.md is generated from the models and must be current; the JSON Schema is stable."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from spec import models
from spec.docs import render_docs
from spec.schema import json_schema

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "spec.md"


def test_docs_are_current() -> None:
    assert DOCS.exists(), "docs/spec.md is missing: run `make docs`"
    assert DOCS.read_text(encoding="utf-8") == render_docs(), (
        "docs/spec.md is stale (the models changed): run `make docs` and commit the result")


def test_docs_module_prints_the_same() -> None:
    out = subprocess.run([sys.executable, "-m", "spec.docs"], cwd=ROOT, capture_output=True,
                         text=True, check=True, encoding="utf-8")
    assert out.stdout == render_docs()


def test_every_key_of_every_section_is_documented() -> None:
    text = render_docs()
    for obj in vars(models).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not models.Section:
            for name in obj.model_fields:
                assert f"| `{name}` |" in text, f"{obj.__name__}.{name} is not in the docs"


def test_stage_variants_are_listed_in_order() -> None:
    text = render_docs()
    union = typing.get_args(typing.get_args(models.Spec.model_fields["filters"].annotation)[0])[0]
    tags = [typing.get_args(m.model_fields["type"].annotation)[0] for m in typing.get_args(union)]
    positions = [text.index(f"### `filters[]` with `type: {tag}`") for tag in tags]
    assert positions == sorted(positions)
    assert "| `lr` | number > 0 | `1e-6` | Peak learning rate. |" in text
    assert ("| `verifiers` | list of section [`reward.verifiers[]`](#reward-verifiers), "
            "at least 1 item | **required** |") in text


def test_json_schema_header_and_stability() -> None:
    schema = json_schema()
    assert list(schema)[:3] == ["$schema", "title", "description"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "rlspec spec"
    assert schema["additionalProperties"] is False
    assert list(schema["$defs"]) == sorted(schema["$defs"])
    assert schema["$defs"]["Optimizer"]["properties"]["lr"]["description"] == "Peak learning rate."
    assert json.dumps(json_schema()) == json.dumps(schema)
