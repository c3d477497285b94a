"""The audit log is append-only and hash-chained; verify_audit finds any edit or gap."""

from __future__ import annotations

from itertools import pairwise
from typing import Any
from uuid import UUID

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from signing_service import audit, signing
from signing_service.models import AuditEntry, Signature, SigningRequest
from tests.fixtures_service import authed, request_body


def append(n: int) -> None:
    for i in range(n):
        with transaction.atomic():
            audit.record("tester", "test.event", data={"i": i})


def raw_sql(sql: str, *params: Any) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@pytest.mark.django_db
def test_an_intact_log_verifies(capsys: Any) -> None:
    append(5)
    call_command("verify_audit")
    assert "audit log OK: 5 entries" in capsys.readouterr().out


@pytest.mark.django_db
def test_it_finds_an_edited_entry() -> None:
    append(5)
    raw_sql("UPDATE signing_service_auditentry SET actor = 'mallory' WHERE seq = 3")
    with pytest.raises(CommandError, match="BROKEN at entry 3: entry 3 was modified"):
        call_command("verify_audit")


@pytest.mark.django_db
def test_it_finds_a_removed_entry() -> None:
    append(5)
    raw_sql("DELETE FROM signing_service_auditentry WHERE seq = 2")
    with pytest.raises(CommandError, match="entry 2 is missing"):
        call_command("verify_audit")


@pytest.mark.django_db
def test_it_finds_entries_removed_from_the_end() -> None:
    append(5)
    raw_sql("DELETE FROM signing_service_auditentry WHERE seq >= 4")
    with pytest.raises(CommandError, match="removed from the end"):
        call_command("verify_audit")


@pytest.mark.django_db
def test_it_finds_a_recomputed_forgery() -> None:
    """Rewriting an entry and its own hash still breaks the link from the next entry."""
    append(4)
    entry = AuditEntry.objects.get(seq=2)
    forged = audit.entry_hash(
        seq=2, created_at=entry.created_at.isoformat(), actor="mallory", action=entry.action,
        target_type="", target_id="", data=entry.data, prev_hash=entry.prev_hash,
    )  # fmt: skip
    raw_sql(
        "UPDATE signing_service_auditentry SET actor = 'mallory', entry_hash = %s WHERE seq = 2",
        forged,
    )
    with pytest.raises(CommandError, match="entry 3 does not link to entry 2"):
        call_command("verify_audit")


@pytest.mark.django_db
def test_the_orm_refuses_to_change_entries() -> None:
    append(1)
    entry = AuditEntry.objects.get()
    with pytest.raises(PermissionError):
        entry.save()
    with pytest.raises(PermissionError):
        entry.delete()
    with pytest.raises(PermissionError):
        AuditEntry.objects.all().delete()
    with pytest.raises(PermissionError):
        AuditEntry.objects.update(actor="x")


@pytest.mark.django_db(transaction=True)
def test_record_outside_a_transaction_is_refused() -> None:
    with pytest.raises(RuntimeError, match="inside the transaction"):
        audit.record("tester", "test.event")
    with pytest.raises(RuntimeError, match="inside the transaction"):
        audit.record_many("tester", "test.event", [(None, {"i": 1})])
    assert not AuditEntry.objects.exists()


@pytest.mark.django_db
def test_entries_appended_in_one_pass_chain_like_single_ones(capsys: Any) -> None:
    append(2)
    request = SigningRequest(pk="6d0b1a7e-0000-4000-8000-000000000001")
    with transaction.atomic():
        made = audit.record_many(
            "tester", "test.bulk", [(request, {"i": i}) for i in range(3)] + [(None, {})]
        )
        assert audit.record_many("tester", "test.bulk", []) == []
    append(1)
    entries = list(AuditEntry.objects.order_by("seq"))
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6, 7]
    assert [e.seq for e in made] == [3, 4, 5, 6]
    assert [(e.action, e.target_type, e.target_id, e.data) for e in entries[2:6]] == [
        ("test.bulk", "SigningRequest", str(request.pk), {"i": 0}),
        ("test.bulk", "SigningRequest", str(request.pk), {"i": 1}),
        ("test.bulk", "SigningRequest", str(request.pk), {"i": 2}),
        ("test.bulk", "", "", {}),
    ]
    assert all(b.prev_hash == a.entry_hash for a, b in pairwise(entries))
    call_command("verify_audit")
    assert "audit log OK: 7 entries" in capsys.readouterr().out
    raw_sql("UPDATE signing_service_auditentry SET data = '{\"i\": 9}' WHERE seq = 4")
    with pytest.raises(CommandError, match="BROKEN at entry 4: entry 4 was modified"):
        call_command("verify_audit")


@pytest.mark.softhsm
@pytest.mark.django_db
def test_no_signature_without_its_audit_record(
    api: Any, issue_token: Any, hsm: Any, monkeypatch: pytest.MonkeyPatch, request: Any
) -> None:
    real_chained = audit._chained

    def failing_chained(seq: int, now: Any, actor: str, action: str, *rest: Any) -> Any:
        if action == "signature.issued":
            raise RuntimeError("audit store unavailable")
        return real_chained(seq, now, actor, action, *rest)

    client = authed(api, issue_token())
    # Stored approved, waiting for a key (none yet): a signer claims it later.
    waiting = client.post("/api/v1/signing-requests/", request_body(), format="json").json()
    assert waiting["state"] == "approved" and waiting["waiting_reason"]
    request.getfixturevalue("active_keys")
    monkeypatch.setattr(audit, "_chained", failing_chained)

    # Signed at submission: request, signature and audit records are one transaction.
    with pytest.raises(RuntimeError, match="audit store unavailable"):
        client.post("/api/v1/signing-requests/", request_body(version="2"), format="json")
    assert Signature.objects.count() == 0
    assert SigningRequest.objects.get().pk == UUID(waiting["id"])  # the new one: not stored

    # Claimed by a signer: the request stays claimed, without a signature.
    with pytest.raises(RuntimeError, match="audit store unavailable"):
        signing.sign(waiting["id"])
    assert Signature.objects.count() == 0
    assert SigningRequest.objects.get().state == "signing"  # left for reconciliation to retry


@pytest.mark.softhsm
@pytest.mark.django_db
def test_every_signature_has_an_audit_record(api: Any, issue_token: Any, active_keys: Any) -> None:
    client = authed(api, issue_token())
    for version in ("1", "2", "3"):
        client.post("/api/v1/signing-requests/", request_body(version=version), format="json")
    signed = {str(s.pk) for s in Signature.objects.all()}
    audited = set(
        AuditEntry.objects.filter(action="signature.issued").values_list("target_id", flat=True)
    )
    assert len(signed) == 3
    assert signed == audited
    call_command("verify_audit")
