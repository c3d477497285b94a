"""One signature at a time: outages wait, dead signers use up attempts, duplicates publish
nothing, and only the batch's new key, while active, ever signs.

Not transactional: no on_commit hook runs, so each test plans and re-signs by hand.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keys import registry, resigning
from keys.models import KeyState, ResignBatch, SigningKey
from keys.revocation import revoke
from signing_service import signing
from signing_service.models import AuditEntry, Signature, SigningRequest
from tests.resigning_helpers import backdate, bulk_signed, rotate

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]


@pytest.fixture
def planned(active_keys: Any) -> tuple[ResignBatch, list[Signature]]:
    """Three staging signatures of a rotated key, planned into a running batch."""
    old = backdate(active_keys["staging"])
    sigs = bulk_signed(old, 3, start=timezone.now() - timedelta(hours=3), step=timedelta(hours=1))
    rotate(old)
    (batch,) = resigning.plan_for_authority("staging")
    assert batch.state == "running"
    return batch, sigs


def successors(sig: Signature) -> int:
    return Signature.objects.filter(supersedes=sig).count()


def test_a_backend_outage_leaves_the_item_waiting_without_using_an_attempt(
    planned: Any, settings: Any
) -> None:
    batch, sigs = planned
    module = settings.PKCS11_MODULE
    settings.PKCS11_MODULE = "/nonexistent/libsofthsm2.so"  # the HSM is unreachable
    registry.reset()
    signing._usable_checked.clear()
    assert resigning.resign_one(sigs[0].pk) == "waiting"
    sigs[0].refresh_from_db()
    assert (sigs[0].state, sigs[0].resign_attempts, successors(sigs[0])) == ("valid", 0, 0)
    assert resigning.run_inline(batch.pk) == {"waiting": 3}  # its chunk waits with it
    assert set(Signature.objects.filter(pk__in=[s.pk for s in sigs]).values_list(
        "state", "resign_attempts")) == {("valid", 0)}  # fmt: skip
    assert ResignBatch.objects.get(pk=batch.pk).state == "running"
    settings.PKCS11_MODULE = module  # back again: the same key signs, nothing else ever did
    registry.reset()
    assert resigning.run_inline(batch.pk) == {"resigned": 3}
    batch.refresh_from_db()
    assert (batch.state, batch.failures) == ("completed", [])
    new_key = SigningKey.objects.get(pk=batch.new_key_id)
    assert set(
        Signature.objects.filter(supersedes__isnull=False).values_list("key", flat=True)
    ) == {new_key.pk}


def test_a_signature_whose_signer_died_five_times_is_given_up(planned: Any) -> None:
    batch, sigs = planned
    # What five kill -9s in the middle of signing it leave behind: five counted attempts.
    Signature.objects.filter(pk=sigs[1].pk).update(resign_attempts=resigning.MAX_ATTEMPTS)
    assert resigning.run_inline(batch.pk) == {"resigned": 2}
    batch.refresh_from_db()
    assert batch.state == "completed"
    assert [f["signature"] for f in batch.failures] == [sigs[1].pk]
    assert "gave up after 5 attempts" in batch.failures[0]["reason"]
    assert Signature.objects.get(pk=sigs[1].pk).state == "valid"
    assert resigning.resign_one(sigs[1].pk) == "not_running"
    assert resigning.progress(batch)["resigned"] == 2


def test_each_try_is_counted_before_the_key_is_used(planned: Any) -> None:
    _, sigs = planned
    Signature.objects.filter(pk=sigs[0].pk).update(resign_attempts=resigning.MAX_ATTEMPTS - 1)
    assert resigning.resign_one(sigs[0].pk) == "resigned"  # the fifth try may still succeed
    sig = Signature.objects.get(pk=sigs[0].pk)
    assert (sig.state, sig.resign_attempts) == ("superseded", resigning.MAX_ATTEMPTS)


def test_a_request_whose_statement_changed_is_never_re_signed(planned: Any) -> None:
    batch, sigs = planned
    SigningRequest.objects.filter(pk=sigs[2].request_id).update(model_version="9.9")
    assert resigning.resign_one(sigs[2].pk) == "failed"
    batch.refresh_from_db()
    assert batch.failures == [
        {"signature": sigs[2].pk, "reason": "the request's statement no longer matches its digest"}
    ]
    assert successors(sigs[2]) == 0
    assert AuditEntry.objects.filter(action="resign_batch.item_failed").count() == 1


def test_a_duplicate_or_late_signer_publishes_nothing(planned: Any) -> None:
    batch, sigs = planned
    late = resigning._sign(sigs[0], batch)  # a worker signed it, then stalled before storing
    assert resigning.resign_one(sigs[0].pk) == "resigned"
    assert resigning.resign_one(sigs[0].pk) == "done"  # the redelivered message
    assert resigning._store(sigs[0], batch, *late) == "done"  # the stalled worker wakes up
    assert successors(sigs[0]) == 1
    assert AuditEntry.objects.filter(action="signature.resigned").count() == 1


def test_only_the_batch_key_while_active_ever_signs(planned: Any) -> None:
    batch, sigs = planned
    signed_before_revocation = resigning._sign(sigs[0], batch)
    revoke(batch.new_key_id, reason="compromised", effective_at=None, actor="ir")
    assert resigning._store(sigs[0], batch, *signed_before_revocation) == "done"
    assert resigning.resign_one(sigs[1].pk) == "key_not_active"
    assert not Signature.objects.filter(supersedes__isnull=False).exists()
    assert Signature.objects.get(pk=sigs[1].pk).resign_attempts == 0
    assert SigningKey.objects.get(pk=batch.new_key_id).state == KeyState.REVOKED


def test_an_unplanned_signature_is_left_alone(active_keys: Any) -> None:
    key = backdate(active_keys["staging"])
    (sig,) = bulk_signed(key, 1, start=timezone.now() - timedelta(hours=1), step=timedelta(0))
    assert resigning.resign_one(sig.pk) == "not_planned"
    assert resigning.resign_one(10**9) == "not_planned"
    assert Signature.objects.get(pk=sig.pk).state == "valid"


def test_planning_leaves_out_what_a_batch_for_the_new_key_covers(planned: Any) -> None:
    batch, sigs = planned
    old, new = batch.old_key, batch.new_key
    (later,) = bulk_signed(old, 1, start=timezone.now() - timedelta(minutes=30),
                           step=timedelta(0), prefix="later")  # fmt: skip
    with CaptureQueriesContext(connection) as queries:
        needing = resigning._needing(old, new, "rotation")
    assert len(queries.captured_queries) == 1  # the covering batches, read at once
    assert [s.pk for s in needing] == [later.pk]
    other = SigningKey.objects.exclude(pk__in=(old.pk, new.pk)).first()
    assert sorted(resigning._needing(old, other, "rotation").values_list("pk", flat=True)) == (
        sorted([*(s.pk for s in sigs), later.pk])
    )
    # Planning's UPDATE names the rows directly: no "id IN (SELECT ...)" second pass.
    with CaptureQueriesContext(connection) as queries:
        resigning._needing(old, other, "rotation").update(resign_attempts=0)
    assert "SELECT" not in queries.captured_queries[-1]["sql"]
