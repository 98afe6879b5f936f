"""The documentation's links and the repository paths it names point at something that exists.

Checked in README.md, BENCHMARKS.md, RELIABILITY.md and every page under docs/: each relative link
(and its #anchor, when it points into a Markdown page) and each backticked path that looks like a file
of the tree (``ragllm/...py``, ``bench/...py``, ``tests/...py``, ``docs/...``). The dated benchmark
history names paths as they were at the time, so only its links are checked. The README stays short.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "BENCHMARKS.md",
        ROOT / "RELIABILITY.md",
        *(ROOT / "docs").rglob("*.md"),
    ]
)
HISTORICAL = {ROOT / "docs" / "benchmarks" / "history.md"}  # its backticked paths may be historical
README_MAX_LINES = 300

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_PATH = re.compile(r"^(?:(?:ragllm|bench|tests)/[\w./@-]+\.py|docs/[\w./@-]+)$")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The page without its fenced code blocks (commands and drawings are not links)."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_prose(page.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def missing_paths(page: Path) -> list[str]:
    missing = []
    for _, span in _CODE_SPAN.findall(_prose(page.read_text(encoding="utf-8"))):
        for word in span.split():
            word = word.strip(".,;:()'\"")
            if _PATH.match(word) and not (ROOT / word).exists():
                missing.append(word)
    return missing


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_points_at_something_that_exists(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", [p for p in PAGES if p not in HISTORICAL], ids=_name)
def test_every_backticked_repository_path_exists(page: Path) -> None:
    assert missing_paths(page) == []


def test_the_pages_are_found() -> None:
    names = {_name(page) for page in PAGES}
    assert {"README.md", "BENCHMARKS.md", "RELIABILITY.md", "docs/architecture.md"} <= names


def test_readme_stays_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; the rest belongs under docs/"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[gone](nowhere.md), [anchor](#nothing), [fine](#title), "
        "`ragllm/no_such_module.py`, `ragllm/serving/prepare.py`\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "nowhere.md: no such file",
        "#nothing: no heading with that anchor",
    ]
    assert missing_paths(page) == ["ragllm/no_such_module.py"]
