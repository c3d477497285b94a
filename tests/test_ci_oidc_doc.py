"""docs/ci-oidc.md explains the CI examples line by line, and stays in step with them.

The YAML blocks of each walk-through, read in order, must be exactly the example file's lines
(blank and comment lines aside): a line changed, added or removed in the example fails here
until its explanation follows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ci-oidc.md"
WALKS = {
    "deploy/ci/github-actions.yml": "## The GitHub Actions workflow, line by line",
    "deploy/ci/gitlab-ci.yml": "## The GitLab CI job, line by line",
}


def _meaningful(lines: list[str]) -> list[str]:
    return [line.rstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def explained_lines(doc: str, heading: str) -> list[str]:
    """The lines of the ```yaml blocks under ``heading``, in order."""
    assert heading in doc, f"docs/ci-oidc.md has no section {heading!r}"
    section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```yaml\n(.*?)^```", section, re.S | re.M)
    return _meaningful([line for block in blocks for line in block.splitlines()])


@pytest.mark.parametrize("example", sorted(WALKS))
def test_every_line_of_the_example_is_explained_in_order(example: str) -> None:
    expected = _meaningful((ROOT / example).read_text().splitlines())
    explained = explained_lines(DOC.read_text(), WALKS[example])
    missing = [line for line in expected if line not in explained]
    assert not missing, f"docs/ci-oidc.md does not explain these lines of {example}: {missing}"
    extra = [line for line in explained if line not in expected]
    assert not extra, f"docs/ci-oidc.md explains lines {example} no longer has: {extra}"
    assert explained == expected, f"docs/ci-oidc.md explains {example} out of order"


def test_each_block_is_followed_by_its_explanation() -> None:
    doc = DOC.read_text()
    for heading in WALKS.values():
        section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
        for after in re.split(r"^```yaml\n.*?^```\n", section, flags=re.S | re.M)[1:]:
            assert after.strip() and not after.lstrip().startswith("```"), (
                f"{heading}: a YAML block without an explanation after it"
            )


def test_a_changed_example_line_is_caught() -> None:
    doc = DOC.read_text().replace("      id-token: write\n", "      id-token: read\n", 1)
    expected = _meaningful((ROOT / "deploy/ci/github-actions.yml").read_text().splitlines())
    assert explained_lines(doc, WALKS["deploy/ci/github-actions.yml"]) != expected
