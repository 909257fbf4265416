"""JSON Schema of the spec, for editors (YAML language servers) and other tools.

The pydantic models are the truth; this only adds the header and a stable key order so the
output can be committed and diffed. `python -m spec.schema` prints it.
"""

from __future__ import annotations

import json
from typing import Any

from spec.models import Spec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "rlspec spec"


def json_schema() -> dict[str, Any]:
    """Spec's JSON Schema (validation mode) with `$schema`, a title and descriptions."""
    body = Spec.model_json_schema(mode="validation")
    head: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "title": TITLE,
        "description": "One RL training run of a Mixture-of-Experts model (see docs/spec.md).",
    }
    defs = body.pop("$defs", {})
    body.pop("title", None)
    body.pop("description", None)
    # Header first, then the root as pydantic orders it (declaration order), then the
    # definitions by name: stable across runs and pydantic versions' dict ordering.
    return {**head, **body, "$defs": {name: defs[name] for name in sorted(defs)}}


def main() -> None:
    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
