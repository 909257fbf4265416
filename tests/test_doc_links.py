"""Every link of the committed documents resolves inside the repository.

A user who clones rlspec has only the repository: a relative link must name a file or folder
in it (no `../shared/...`), and an anchor (`file.md#section`, `#section`) must name a heading
or an `<a id>` of the target document. Web links (http, https, mailto) are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"out", "runs", "node_modules"}
DOCS = sorted(p for p in ROOT.rglob("*.md")
              if not any(part.startswith(".") or part in SKIP
                         for part in p.relative_to(ROOT).parts[:-1]))
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _links(text: str) -> list[str]:
    text = FENCE.sub("", text)  # code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inline code
    return [a or b for a, b in LINK.findall(text)]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out: set[str] = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_documents_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/design.md", "docs/checks.md", "docs/algorithms.md",
            "docs/spec.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve_inside_the_repository(doc: Path) -> None:
    bad = []
    for link in _links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, flags=re.I):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if target.startswith("/") or not path.is_relative_to(ROOT):
            bad.append(f"{link}: outside the repository")
        elif not path.exists():
            bad.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad.append(f"{link}: no heading or <a id> '{anchor}' in {path.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_no_document_points_at_the_developers_notes() -> None:
    for doc in DOCS:
        assert "shared/DESIGN.md" not in doc.read_text(encoding="utf-8"), doc
