"""docs/threat-model.md cites only tests that exist, and every control cites at least one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAT_MODEL = ROOT / "docs" / "threat-model.md"
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _defined_tests(path: Path) -> set[str]:
    """Test functions defined in a file, at module level or in a test class."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return names


def test_every_cited_test_exists() -> None:
    citations = CITATION.findall(THREAT_MODEL.read_text())
    assert len(citations) > 50
    missing = []
    for file, name in sorted(set(citations)):
        path = ROOT / file
        if not path.is_file() or name not in _defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, (
        "docs/threat-model.md cites tests that do not exist (renamed or removed?): "
        + ", ".join(missing)
    )


def test_every_control_names_a_test() -> None:
    text = THREAT_MODEL.read_text()
    controls = text.split("## Threats and controls", 1)[1].split("## Residual risks", 1)[0]
    rows = [
        line
        for line in controls.splitlines()
        if line.startswith("| ") and not line.startswith("| threat |")
    ]
    assert len(rows) > 30
    bare = [row[:80] for row in rows if not CITATION.search(row.rsplit(" | ", 1)[-1])]
    assert not bare, f"controls without a test in their last column: {bare}"


def test_the_citation_check_can_fail(tmp_path: Path) -> None:
    """A renamed test is not found: the check looks at definitions, not at mentions."""
    source = tmp_path / "test_x.py"
    source.write_text("def test_real():\n    pass\n\n# test_mentioned_only\n")
    assert _defined_tests(source) == {"test_real"}
