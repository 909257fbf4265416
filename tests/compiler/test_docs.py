"""docs/checks.md is generated from the rules (compiler.docs) and must be current."""

from __future__ import annotations

from pathlib import Path

from compiler import checks, docs
from runtime import capabilities

ROOT = Path(__file__).resolve().parents[2]
CHECKS_MD = ROOT / "docs" / "checks.md"


def test_checks_doc_is_current() -> None:
    assert CHECKS_MD.exists(), "docs/checks.md is missing: run `make docs`"
    assert CHECKS_MD.read_text(encoding="utf-8") == docs.render_checks(), (
        "docs/checks.md is stale (a rule, its message or an example changed): run `make docs` "
        "and commit the result")


def test_every_rule_has_an_entry_and_an_example() -> None:
    assert [r.__name__ for r in checks.RULES] == list(docs.CHECK_EXAMPLES)
    assert set(capabilities.RULES) | set(capabilities.FLAG_RULES) == set(docs.REFUSAL_EXAMPLES)
    for name, examples in {**docs.CHECK_EXAMPLES, **docs.REFUSAL_EXAMPLES}.items():
        # a rule on train.sh's flags alone is reached by an edited bundle, not by a spec
        assert examples or name in capabilities.FLAG_RULES, f"{name} has no example"
    text = docs.render_checks()
    for name in [*docs.CHECK_EXAMPLES, *docs.REFUSAL_EXAMPLES, *docs.PREFLIGHT_CHECKS]:
        assert f"\n### `{name}`\n" in text


def test_each_example_triggers_its_rule_only_by_that_rule() -> None:
    # The messages shown are the rule's own: the check examples' are problems of that rule,
    # with the severity printed; the refusal examples' name the jobs that refuse.
    msgs = docs.check_messages("expert_grid", docs.CHECK_EXAMPLES["expert_grid"][0])
    assert len(msgs) == 1 and ": error: train.parallelism.expert:" in msgs[0]
    assert "hint: set train.parallelism.expert_tensor: 1" in msgs[0]
    msgs = docs.refusal_messages("weight_sync", docs.REFUSAL_EXAMPLES["weight_sync"][0])
    assert len(msgs) == 1 and "(job rl would refuse to start)" in msgs[0]
