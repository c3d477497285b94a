"""docs/api-reference.md is exactly what ``manage.py api_reference`` renders from the schema."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from signing_service.management.commands.api_reference import (
    REGENERATE,
    current_schema,
    render,
)

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "api-reference.md"


def test_the_committed_reference_is_the_generators_output() -> None:
    out = io.StringIO()
    call_command("api_reference", stdout=out)
    assert REFERENCE.read_text() == out.getvalue(), (
        f"docs/api-reference.md is out of date with the API schema; run: {REGENERATE}"
    )


def test_every_endpoint_and_answer_of_the_schema_is_in_the_reference() -> None:
    schema = current_schema()
    text = render(schema)
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert f"### `{method.upper()} {path}`" in text
            section = text.split(f"### `{method.upper()} {path}`", 1)[1].split("\n### ", 1)[0]
            for status in op["responses"]:
                assert f"\n| {status} |" in section, f"{method} {path}: no {status} row"
    assert "| 422 | `application/json` [Error](#error) |" in text


def test_check_fails_on_a_stale_file_and_names_the_command(tmp_path: Path) -> None:
    stale = tmp_path / "api-reference.md"
    stale.write_text(REFERENCE.read_text().replace("| 409 |", "| 410 |"))
    with pytest.raises(CommandError, match=re.escape(REGENERATE)):
        call_command("api_reference", "--out", str(stale), "--check")
    call_command("api_reference", "--out", str(stale))
    call_command("api_reference", "--out", str(stale), "--check")
    assert stale.read_text() == REFERENCE.read_text()
