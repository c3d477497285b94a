"""Re-signing production signatures in bulk is itself a two-person approved batch (SPEC 9)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.utils import timezone

from keys import resigning
from keys.models import ResignBatch, ResignDecision
from signing_service.models import AuditEntry, Signature
from signing_service.signing import SigningRefused
from tests.resigning_helpers import backdate, bulk_signed, rotate

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def batch(active_keys: Any, make_user: Any) -> ResignBatch:
    """A production key with 5 signatures rotated: its batch waits for two approvers."""
    make_user("alice"), make_user("bob")
    old = backdate(active_keys["production"])
    bulk_signed(old, 5, start=timezone.now() - timedelta(days=2), step=timedelta(hours=1))
    mail.outbox.clear()
    rotate(old)
    return ResignBatch.objects.get()


def resigned() -> int:
    return Signature.objects.filter(supersedes__isnull=False).count()


def approve(batch: ResignBatch, user: Any, **kwargs: Any) -> resigning.DecisionOutcome:
    kwargs.setdefault("otp_verified_at", timezone.now())
    return resigning.decide(batch.pk, user, approve=True, **kwargs)


def test_the_batch_waits_and_the_approvers_are_emailed_a_link(batch: ResignBatch) -> None:
    assert (batch.state, batch.required_approvals, batch.total) == ("pending_approval", 2, 5)
    assert sorted(m.to[0] for m in mail.outbox) == ["alice@company.com", "bob@company.com"]
    assert f"/resign-batches/{batch.pk}/" in mail.outbox[0].body
    assert resigned() == 0


def test_nothing_is_re_signed_before_two_distinct_approvers_approve(
    batch: ResignBatch, make_user: Any
) -> None:
    from django.contrib.auth import get_user_model

    alice, bob = (get_user_model().objects.get(username=n) for n in ("alice", "bob"))
    first = approve(batch, alice, comment="checked the list")
    assert (first.batch.state, first.approvals_received) == ("pending_approval", 1)
    assert resigned() == 0
    second = approve(batch, bob)
    assert second.approvals_received == 2
    batch.refresh_from_db()
    assert batch.state == "completed" and batch.approved_at is not None
    assert resigned() == 5
    actions = list(
        AuditEntry.objects.filter(target_id=str(batch.pk)).values_list("action", flat=True)
    )
    assert actions[:4] == [
        "resign_batch.planned",
        "resign_decision.approve",
        "resign_decision.approve",
        "resign_batch.approved",
    ]
    assert actions[-1] == "resign_batch.completed"


def test_a_non_approver_is_refused(batch: ResignBatch, make_user: Any) -> None:
    for user in (make_user("sam", approves=("staging",)), make_user("carol", approves=())):
        with pytest.raises(SigningRefused) as exc:
            approve(batch, user)
        assert (exc.value.status, exc.value.code) == (403, "not_approver")
        assert "approvers of 'production'" in exc.value.message
    assert not ResignDecision.objects.exists()


@pytest.mark.parametrize("verified", [None, timedelta(minutes=6)])
def test_a_stale_second_factor_is_refused(
    batch: ResignBatch, make_user: Any, verified: timedelta | None
) -> None:
    from django.contrib.auth import get_user_model

    alice = get_user_model().objects.get(username="alice")
    when = None if verified is None else timezone.now() - verified
    with pytest.raises(SigningRefused) as exc:
        approve(batch, alice, otp_verified_at=when)
    assert (exc.value.status, exc.value.code) == (403, "second_factor_required")
    assert not ResignDecision.objects.exists()


def test_the_same_person_cannot_decide_twice(batch: ResignBatch) -> None:
    from django.contrib.auth import get_user_model

    alice = get_user_model().objects.get(username="alice")
    approve(batch, alice)
    for again in (True, False):
        with pytest.raises(SigningRefused) as exc:
            resigning.decide(batch.pk, alice, approve=again, otp_verified_at=timezone.now())
        assert (exc.value.status, exc.value.code) == (409, "already_decided")
    assert ResignDecision.objects.count() == 1
    assert ResignBatch.objects.get(pk=batch.pk).state == "pending_approval"


def test_one_rejection_rejects_the_batch_for_good(batch: ResignBatch, make_user: Any) -> None:
    from django.contrib.auth import get_user_model

    alice, bob = (get_user_model().objects.get(username=n) for n in ("alice", "bob"))
    approve(batch, alice)
    outcome = resigning.decide(
        batch.pk,
        bob,
        approve=False,
        comment="not during the freeze",
        otp_verified_at=timezone.now(),
    )
    assert outcome.batch.state == "rejected"
    with pytest.raises(SigningRefused) as exc:
        approve(batch, make_user("erin"))
    assert (exc.value.status, exc.value.code) == (409, "not_pending")
    assert resigning.resign_one(Signature.objects.filter(resign_batch=batch).first().pk) == (
        "not_running"
    )
    assert resigning.plan_for_authority("production") == []  # a rejection is not re-planned
    assert resigned() == 0
    assert AuditEntry.objects.filter(action="resign_batch.rejected").count() == 1


def test_an_unknown_batch_is_not_found(batch: ResignBatch) -> None:
    import uuid

    from django.contrib.auth import get_user_model

    with pytest.raises(SigningRefused) as exc:
        resigning.decide(
            uuid.uuid4(),
            get_user_model().objects.get(username="alice"),
            approve=True,
            otp_verified_at=timezone.now(),
        )
    assert exc.value.status == 404


def test_re_signed_production_statements_list_their_approvals_read_once_per_chunk(
    active_keys: Any, make_user: Any
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from approvals.models import Approval
    from keys.models import SigningKey
    from signing_service.bundle import SERVICE_PREDICATE_KEY, load_public_key, verify_bundle
    from signing_service.models import SigningRequest

    alice, bob = make_user("alice"), make_user("bob")
    old = backdate(active_keys["production"])
    sigs = bulk_signed(old, 3, start=timezone.now() - timedelta(days=2), step=timedelta(hours=1))
    decided = timezone.now() - timedelta(days=3)
    for sig in sigs:
        req = sig.request
        SigningRequest.objects.filter(pk=req.pk).update(required_approvals=2)
        for minutes, user in enumerate((bob, alice)):  # bob first: order is by decision time
            Approval.objects.create(
                request=req, approver=user, approver_identity=user.email, decision="approve",
                statement_digest=req.statement_digest, policy_digest=req.policy_digest,
                decided_at=decided + timedelta(minutes=minutes), otp_verified_at=decided,
            )  # fmt: skip
    rotate(old)
    batch = ResignBatch.objects.get()
    approve(batch, alice)
    with CaptureQueriesContext(connection) as queries:
        approve(batch, bob)  # the quorum: the batch is re-signed now, in one chunk
    assert resigned() == 3
    table = Approval._meta.db_table
    reads = [q["sql"] for q in queries.captured_queries if f'FROM "{table}"' in q["sql"]]
    assert len(reads) == 1, reads
    new_key = SigningKey.objects.get(authority="production", state="active")
    for new in Signature.objects.with_bundle().filter(supersedes__isnull=False):
        statement = verify_bundle(new.bundle.encode(), load_public_key(new_key.public_key_pem))
        listed = statement.statement["predicate"][SERVICE_PREDICATE_KEY]["approvals"]
        assert [a["approver"] for a in listed] == [bob.email, alice.email]
