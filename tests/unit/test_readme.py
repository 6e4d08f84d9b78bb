"""The README fits on a screen or two, and it and the docs/ pages beside it link only to what exists
(issue 24, item 6). What each page states is checked where the fact is declared (test_pack_rules.py,
test_waiting.py, test_executor_config.py, tests/stack/test_deploy.py...)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 300

LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _links(text: str) -> list[str]:
    return LINK.findall(FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_readme_fits_on_a_screen_or_two():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to a docs/ page"


def test_readme_links_every_docs_page():
    assert DOCS, "docs/ holds the pages the README links"
    targets = {(README.parent / link.split("#")[0]).resolve() for link in _links(README.read_text())}
    assert [page.name for page in DOCS if page.resolve() not in targets] == []


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_point_at_what_exists(page: Path):
    broken = []
    for link in _links(page.read_text()):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists() or REPO not in path.parents:
            broken.append(f"{link}: no such file in the repository")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no such heading")
    assert broken == []


def test_readme_states_the_platform_the_local_stack_runs_on():
    from covalent_gcpbatch_plugin.local import stack

    requirements = README.read_text().split("\n## Requirements\n")[1].split("\n## ")[0]
    assert stack.FAKE_GCS_BINARY.name.endswith("-linux-amd64")
    assert "Linux x86_64" in requirements and "linux-amd64 fake-gcs-server binary" in requirements
    assert "Java 17" in requirements and "google-cloud-cli-pubsub-emulator" in requirements
    assert "**On a Mac**" in requirements
