"""``field__any``: the rows ``field__in`` finds, sent to PostgreSQL as one array parameter."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from signing_service import rows
from signing_service.models import AuditEntry, SigningRequest
from tests.test_rows import NOW, request

pytestmark = pytest.mark.django_db


def entries(n: int) -> list[AuditEntry]:
    made = [
        AuditEntry(
            seq=1000 + i, created_at=NOW, actor="t", action=f"a{i}", entry_hash="0", prev_hash="0"
        )
        for i in range(n)
    ]
    rows.insert(made)
    return made


def both(queryset: Any, **lookup: Any) -> tuple[set[Any], set[Any]]:
    ((name, values),) = lookup.items()
    found_any = set(queryset.filter(**{f"{name}__any": values}).values_list("pk", flat=True))
    found_in = set(queryset.filter(**{f"{name}__in": values}).values_list("pk", flat=True))
    return found_any, found_in


def test_integer_keys_find_what_in_finds_and_postgresql_gets_one_parameter() -> None:
    made = entries(600)
    wanted = [e.pk for e in made[::2]] + [None, 10**9]  # NULL and an unknown id match nothing
    with CaptureQueriesContext(connection) as queries:
        found_any, found_in = both(AuditEntry.objects, pk=wanted)
    assert found_any == found_in == {e.pk for e in made[::2]}
    sql = queries.captured_queries[0]["sql"]
    if connection.vendor == "postgresql":
        # One array literal ('{1,3,...}'::int4[]), not 302 placeholders quoted one by one.
        assert "= ANY('{" in sql and " IN (" not in sql
    else:
        assert " IN (" in sql


def test_uuid_and_text_values_match_as_in_does() -> None:
    saved = [request(f"1.{i}") for i in range(3)]
    rows.insert(saved)
    ids = [saved[0].pk, saved[2].pk]
    assert both(SigningRequest.objects, pk=ids) == ({*ids}, {*ids})
    versions = ["1.1", "9.9"]
    assert both(SigningRequest.objects, model_version=versions) == ({saved[1].pk},) * 2


def test_an_empty_list_matches_nothing_and_excludes_nothing() -> None:
    made = entries(3)
    assert not AuditEntry.objects.filter(pk__any=[]).exists()
    assert not AuditEntry.objects.filter(pk__any=[None]).exists()
    assert AuditEntry.objects.exclude(pk__any=[]).count() == len(made)
    assert AuditEntry.objects.exclude(pk__any=[made[0].pk]).count() == len(made) - 1
