"""signing_service.rows.insert writes exactly the row Model.save(force_insert=True) writes."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from signing_service import rows
from signing_service.models import (
    AuditEntry,
    RequestState,
    Signature,
    SignatureBundle,
    SigningRequest,
)

DIGEST = hashlib.sha256(b"rows").hexdigest()


NOW = timezone.now()


def request(version: str, **extra: Any) -> SigningRequest:
    return SigningRequest(
        authority="staging",
        model_name="rows-model",
        model_version=version,
        resources=[{"name": "w.bin", "algorithm": "sha256", "digest": DIGEST}],
        ignore_paths=["README.md"],
        root_digest=DIGEST,
        statement_digest=DIGEST,
        policy_digest=DIGEST,
        state=RequestState.SIGNED,
        requester="ci@company.com",
        ci={"repository": "https://git.example.com/r", "nested": {"ü": [1, 2.5, None, True]}},
        body_digest=DIGEST,
        signed_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        **extra,
    )


def stored(obj: Any) -> dict[str, Any]:
    """The row as the ORM reads it back, without its identity."""
    fresh = type(obj).objects.get(pk=obj.pk)
    values = model_to_dict(fresh)
    for name in ("id", "model_version", "seq", "entry_hash", "created_at", "updated_at"):
        values.pop(name, None)
    return values


@pytest.mark.django_db
def test_a_row_inserted_by_rows_reads_back_as_the_orm_saves_it() -> None:
    by_orm, by_rows = request("1.0.0"), request("2.0.0")
    by_orm.save(force_insert=True)
    rows.insert([by_rows])
    assert stored(by_rows) == stored(by_orm)
    # Defaults and auto_now are applied as save() applies them; the instance is saved.
    fresh = SigningRequest.objects.get(pk=by_rows.pk)
    assert fresh.updated_at == by_rows.updated_at and fresh.created_at == by_rows.created_at
    assert by_rows._state.adding is False and by_rows._state.db == "default"
    assert isinstance(fresh.pk, uuid.UUID) and fresh.ci["nested"] == {"ü": [1, 2.5, None, True]}
    many = [request(f"3.{i}") for i in range(rows.COPY_FROM)]  # PostgreSQL: by COPY
    rows.insert(many)
    assert [stored(r) for r in many[:3]] == [stored(by_orm)] * 3


def entry(seq: int, data: dict[str, Any]) -> AuditEntry:
    return AuditEntry(
        seq=seq,
        created_at=timezone.now(),
        actor="rows@company.com",
        action="rows.test",
        data=data,
        prev_hash="0" * 64,
        entry_hash=f"{seq:064x}",
    )


@pytest.mark.django_db(transaction=True)
def test_many_rows_get_their_own_database_ids_in_order() -> None:
    entries = [entry(1000 + i, {"i": i}) for i in range(rows.BATCH + 7)]
    with CaptureQueriesContext(connection) as queries:
        rows.insert(entries)
    inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("INSERT")]
    # SQLite: two statements of at most BATCH rows; PostgreSQL: one COPY, no INSERT.
    assert len(inserts) == (0 if connection.vendor == "postgresql" else 2)
    ids = [e.pk for e in entries]
    assert None not in ids and len(set(ids)) == len(ids)
    # Each object got the id of its own row, whatever order the database chose.
    assert dict(AuditEntry.objects.filter(pk__in=ids).values_list("pk", "seq")) == {
        e.pk: e.seq for e in entries
    }
    one_by_orm = entry(5000, {"i": -1})
    one_by_orm.save()
    assert stored(one_by_orm) | {"data": None} == stored(entries[0]) | {"data": None}


@pytest.mark.django_db(transaction=True)
def test_a_failed_insert_stores_nothing_of_its_batch() -> None:
    first = entry(7, {})
    rows.insert([first])
    clash = [entry(8, {}), entry(7, {})]  # seq is unique
    with pytest.raises(IntegrityError), transaction.atomic():
        rows.insert(clash)
    assert list(AuditEntry.objects.values_list("seq", flat=True)) == [7]
    many = [entry(100 + i, {}) for i in range(rows.COPY_FROM)] + [entry(7, {})]
    with pytest.raises(IntegrityError), transaction.atomic():
        rows.insert(many)  # PostgreSQL: one COPY, refused whole
    assert list(AuditEntry.objects.values_list("seq", flat=True)) == [7]


def test_bad_calls_are_refused_before_any_sql() -> None:
    with pytest.raises(TypeError, match="all objects must be of one model"):
        rows.insert([entry(1, {}), request("1")])
    given = entry(2, {})
    given.pk = 99
    with pytest.raises(ValueError, match="primary key on all objects or on none"):
        rows.insert([given, entry(3, {})])
    rows.insert([])  # nothing to do


def field_values(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        f.attname: getattr(obj, f.attname)
        for f in type(obj)._meta.concrete_fields
        if f.attname not in skip
    }


def test_new_builds_the_row_keywords_build() -> None:
    values = {"request_id": uuid.uuid4(), "key_id": 5, "payload_digest": DIGEST,
              "signed_at": NOW, "supersedes_id": 3}  # fmt: skip
    audit_values = {"seq": 3, "created_at": NOW, "actor": "a", "action": "b", "data": {"k": [1]},
                    "prev_hash": "0", "entry_hash": "1"}  # fmt: skip
    cases: list[tuple[Any, dict[str, Any], tuple[str, ...]]] = [
        (Signature, values, ()),
        (Signature, {"request_id": values["request_id"]}, ("signed_at",)),  # default: now()
        (SignatureBundle, {"signature_id": 7, "json": "{}"}, ()),
        (AuditEntry, audit_values, ()),
        (SigningRequest, {"authority": "staging", "resources": []}, ("id", "created_at")),
    ]
    for model, given, made_per_call in cases:
        built, keywords = rows.new(model, **given), model(**given)
        assert field_values(built, made_per_call) == field_values(keywords, made_per_call)
        assert built._state.adding
    with pytest.raises(TypeError, match="Signature has no fields \\['key'\\]"):
        rows.new(Signature, key=None)  # by attribute name only (key_id)


def test_column_names_come_back_in_the_order_from_db_takes_them() -> None:
    names = ("requester", "id", "statement_digest", "authority")
    assert rows.in_model_order(SigningRequest, names) == (
        "id", "authority", "statement_digest", "requester"
    )  # fmt: skip
    fresh = SigningRequest.from_db("default", rows.in_model_order(SigningRequest, names),
                                   (uuid.UUID(int=1), "staging", DIGEST, "ci@company.com"))  # fmt: skip
    assert (fresh.authority, fresh.requester, fresh.statement_digest) == (
        "staging", "ci@company.com", DIGEST
    )  # fmt: skip
    with pytest.raises(ValueError, match="SigningRequest has no columns \\['api_tokn'\\]"):
        rows.in_model_order(SigningRequest, ("api_tokn", "id"))


@pytest.mark.django_db
def test_a_stored_signature_knows_its_bundle_without_a_query() -> None:
    req = request("4.0.0")
    rows.insert([req])
    one = Signature.objects.store(Signature(request=req, payload_digest=DIGEST), '{"one": 1}')
    many = Signature.objects.store_many(
        (Signature(request=req, payload_digest=DIGEST), f'{{"n": {n}}}') for n in range(3)
    )
    with CaptureQueriesContext(connection) as queries:
        assert [s.bundle for s in (one, *many)] == [
            '{"one": 1}',
            '{"n": 0}',
            '{"n": 1}',
            '{"n": 2}',
        ]
    assert queries.captured_queries == []
    assert [Signature.objects.get(pk=s.pk).bundle for s in many] == [s.bundle for s in many]
