"""Rotation and re-planning: the old key's valid signatures are re-signed by the new key.

Inline mode (the default): activating the new key plans the batch after the commit and a
non-approval authority re-signs it right away, without any broker.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keys import resigning
from keys.models import Incident, ResignBatch
from signing_service import audit, bundle
from signing_service.models import AuditEntry, RequestState, Signature, SigningRequest
from tests.resigning_helpers import (
    backdate,
    bulk_signed,
    revoke_and_replace,
    rotate,
    supersedes_entry,
)

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]


def keyless_signature() -> Signature:
    """A keyless (Sigstore) signature row: no service key, so never re-signed."""
    req = SigningRequest.objects.create(
        authority="staging", model_name="keyless-model", model_version="1", resources=[],
        root_digest="0" * 64, statement_digest="0" * 64, policy_digest="0" * 64,
        state=RequestState.SIGNED, requester="dev@company.com", body_digest="0" * 64,
    )  # fmt: skip
    return Signature.objects.store(
        Signature(
            request=req, key=None, signer_identity="dev@company.com", payload_digest="0" * 64
        ),
        "{}",
    )


def test_rotation_re_signs_every_valid_signature_and_leaves_keyless_ones_alone(
    active_keys: Any,
) -> None:
    old = backdate(active_keys["staging"])
    olds = bulk_signed(old, 20, start=timezone.now() - timedelta(days=5), step=timedelta(hours=1))
    keyless = keyless_signature()
    new = rotate(old)  # activation plans after the commit; staging needs no approval
    batch = ResignBatch.objects.get()
    assert (batch.reason, batch.state, batch.total) == ("rotation", "completed", 20)
    assert (batch.old_key_id, batch.new_key_id, batch.required_approvals) == (old.pk, new.pk, 0)
    assert batch.models_summary[:2] == [
        {"model": "model-0", "version": "1.0"},
        {"model": "model-1", "version": "1.0"},
    ]
    public = bundle.load_public_key(new.public_key_pem)
    for sig in olds:
        sig.refresh_from_db()
        assert sig.state == "superseded"
        successor = Signature.objects.get(supersedes=sig)
        assert (successor.key_id, successor.state, successor.request_id) == (
            new.pk,
            "valid",
            sig.request_id,
        )
        verified = bundle.verify_bundle(successor.bundle, public)
        assert verified.service_metadata["request_id"] == str(sig.request_id)
        assert supersedes_entry(successor) == {
            "signature": sig.pk,
            "key_hint": old.hint,
            "payload_digest": sig.payload_digest,
            "reason": "rotation",
        }
    keyless.refresh_from_db()
    assert (keyless.state, keyless.resign_batch_id) == ("valid", None)
    assert AuditEntry.objects.filter(action="signature.resigned").count() == 20
    assert AuditEntry.objects.filter(action="resign_batch.planned").count() == 1
    assert AuditEntry.objects.filter(action="resign_batch.completed").count() == 1
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)
    # Planning again (the sweep, another activation hook) finds nothing new.
    assert resigning.plan_for_authority("staging") == []
    assert ResignBatch.objects.count() == 1


@pytest.mark.django_db  # not transactional: no on_commit hook, so the test plans, watched
def test_planning_marks_the_signatures_in_one_update_and_twice_is_once(
    active_keys: Any,
) -> None:
    old = backdate(active_keys["production"])
    bulk_signed(old, 30, start=timezone.now() - timedelta(days=3), step=timedelta(minutes=5))
    rotate(old)
    assert not ResignBatch.objects.exists()
    with CaptureQueriesContext(connection) as ctx:
        (batch,) = resigning.plan_for_authority("production")
    marking = [
        q["sql"]
        for q in ctx.captured_queries
        if q["sql"].startswith('UPDATE "signing_service_signature"')
    ]
    assert len(marking) == 1, marking
    assert batch.state == "pending_approval" and batch.total == 30
    assert Signature.objects.filter(resign_batch=batch).count() == 30
    assert resigning.plan_for_authority("production") == []
    assert ResignBatch.objects.count() == 1
    assert not Signature.objects.filter(supersedes__isnull=False).exists()  # waits for approval


def test_nothing_is_planned_without_an_active_key(active_keys: Any) -> None:
    from keys.revocation import revoke

    old = backdate(active_keys["staging"])
    bulk_signed(old, 5, start=timezone.now() - timedelta(hours=5), step=timedelta(minutes=1))
    revoke(old.pk, reason="compromised", effective_at=None, actor="ir")
    assert resigning.plan_for_authority("staging") == []
    assert not ResignBatch.objects.exists()
    assert Incident.objects.get().state == "open"


def test_a_second_revocation_is_planned_and_the_chain_is_linked(active_keys: Any) -> None:
    first = backdate(active_keys["staging"])
    olds = bulk_signed(first, 6, start=timezone.now() - timedelta(hours=6), step=timedelta(hours=1))
    incident1, second = revoke_and_replace(first, timezone.now() - timedelta(hours=3, minutes=30))
    batch1 = ResignBatch.objects.get()
    assert (batch1.reason, batch1.state, batch1.total) == ("revocation", "completed", 3)
    assert batch1.incident_id == incident1.pk
    incident1.refresh_from_db()
    assert incident1.state == "resolved"
    assert resigning.plan_for_authority("staging") == []  # nothing new
    # The second key is compromised too, from before it re-signed anything.
    incident2, third = revoke_and_replace(second, second.not_before)
    assert incident2.quarantined == 3
    batch2 = ResignBatch.objects.get(old_key=second)
    assert (batch2.new_key_id, batch2.state, batch2.total) == (third.pk, "completed", 3)
    for sig in olds[3:]:
        middle = Signature.objects.get(supersedes=sig)
        last = Signature.objects.get(supersedes=middle)
        assert (middle.key_id, middle.state) == (second.pk, "superseded")
        assert (last.key_id, last.state) == (third.pk, "valid")
        assert supersedes_entry(last)["reason"] == "revocation"
    for sig in olds[:3]:  # before the first effective time: still valid, never re-signed
        assert Signature.objects.get(pk=sig.pk).state == "valid"
    assert ResignBatch.objects.count() == 2
    assert resigning.plan_for_authority("staging") == []


def test_a_batch_whose_new_key_was_replaced_is_closed_and_planned_again(
    active_keys: Any, make_user: Any
) -> None:
    old = backdate(active_keys["production"])
    bulk_signed(old, 4, start=timezone.now() - timedelta(hours=4), step=timedelta(hours=1))
    middle = rotate(old)
    stale = ResignBatch.objects.get()
    assert stale.state == "pending_approval" and stale.new_key_id == middle.pk
    newest = rotate(middle)
    stale.refresh_from_db()
    assert stale.state == "completed"
    fresh = ResignBatch.objects.get(new_key=newest, old_key=old)
    assert fresh.state == "pending_approval" and fresh.total == 4
    assert Signature.objects.filter(resign_batch=fresh).count() == 4
    assert not ResignBatch.objects.filter(old_key=middle).exists()  # it signed nothing
