"""Every relative link of README.md and docs/*.md leads somewhere: to a file of the
repository and, for ``#anchor``, to a heading of that file (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code: links shown as code are examples, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = anchor(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


def test_the_slug_rules() -> None:
    assert anchor("Audit (auditor role, `audit:read`)") == "audit-auditor-role-auditread"
    assert anchor("A request's path") == "a-requests-path"
    assert anchor("Export (format version 2)") == "export-format-version-2"


def test_the_documents_link_to_each_other() -> None:
    """A check that finds no links would pass on anything."""
    assert len(DOCUMENTS) >= 10
    assert sum(len(relative_links(path)) for path in DOCUMENTS) > 50


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(document: Path) -> None:
    broken = []
    for link in relative_links(document):
        target, _, fragment = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        if not path.exists():
            broken.append(f"{link}: no file {path.relative_to(REPO)}")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{link}: no heading #{fragment} in {path.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


# A code span that names a file of the repository: `gateway/routes/kzg.py`,
# `tests/gateway/test_settings.py::test_name` (globs and placeholders are not names).
REPO_PATH = re.compile(
    r"`((?:kzg|audit|auth|gateway|migrations|policies|deploy|bench|tests|scripts|docs)/"
    r"[\w./-]*)(?:::(\w+))?`"
)


@pytest.mark.parametrize(
    "document",
    [*DOCUMENTS, REPO / "bench" / "README.md"],
    ids=lambda p: p.relative_to(REPO).as_posix(),
)
def test_every_file_and_test_the_documents_name_exists(document: Path) -> None:
    missing = []
    for path, function in REPO_PATH.findall(document.read_text(encoding="utf-8")):
        target = REPO / path.rstrip(".")
        if not target.exists():
            missing.append(f"{path}: no such file")
        elif function and not re.search(rf"def {function}\b", target.read_text()):
            missing.append(f"{path}::{function}: no such function")
    assert not missing, "\n".join(missing)


def test_the_documents_name_files_and_tests() -> None:
    """A check that finds no names would pass on anything."""
    named = [REPO_PATH.findall(path.read_text(encoding="utf-8")) for path in DOCUMENTS]
    assert sum(map(len, named)) > 100
    assert sum(1 for spans in named for _, function in spans if function) >= 2
