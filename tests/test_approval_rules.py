"""The approval rules hold in the service layer, whatever the caller (SPEC section 8)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.utils import timezone

from approvals.models import Approval
from approvals.services import decide
from signing_service.models import AuditEntry, Signature, SigningRequest
from signing_service.signing import SigningRefused

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]


def fresh() -> Any:
    return timezone.now()


def test_two_distinct_approvers_sign_the_request(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    first = decide(req.pk, make_user("alice"), "approve", otp_verified_at=fresh())
    assert first.request.state == "pending_approval"
    assert first.approvals_received == 1
    second = decide(req.pk, make_user("bob"), "approve", otp_verified_at=fresh())
    assert second.request.state == "signed"
    assert Signature.objects.filter(request=req).count() == 1


def test_the_signed_statement_lists_the_approvers(pending_request: Any, make_user: Any) -> None:
    import base64
    import json

    from signing_service.bundle import SERVICE_PREDICATE_KEY

    req = pending_request()
    decide(req.pk, make_user("alice"), "approve", otp_verified_at=fresh())
    decide(req.pk, make_user("bob"), "approve", otp_verified_at=fresh())
    bundle = json.loads(Signature.objects.get(request=req).bundle)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    approvals = statement["predicate"][SERVICE_PREDICATE_KEY]["approvals"]
    assert [a["approver"] for a in approvals] == ["alice@company.com", "bob@company.com"]
    assert all(a["decided_at"] for a in approvals)


def test_the_same_person_twice_is_refused(pending_request: Any, make_user: Any) -> None:
    req, alice = pending_request(), make_user("alice")
    decide(req.pk, alice, "approve", otp_verified_at=fresh())
    with pytest.raises(SigningRefused) as exc:
        decide(req.pk, alice, "approve", otp_verified_at=fresh())
    assert exc.value.status == 409 and exc.value.code == "already_decided"
    assert Approval.objects.count() == 1
    assert SigningRequest.objects.get(pk=req.pk).state == "pending_approval"


def test_self_approval_is_refused_for_requester_and_actor(
    pending_request: Any, make_user: Any
) -> None:
    req = pending_request(ci={"actor": "dave", "repository": "org/models"})
    for user in (make_user("dave"), make_user("ml-platform-ci")):
        with pytest.raises(SigningRefused) as exc:
            decide(req.pk, user, "approve", otp_verified_at=fresh())
        assert exc.value.code == "self_approval" and exc.value.status == 403
    assert Approval.objects.count() == 0


def test_a_rejection_ends_the_request(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    decide(req.pk, make_user("alice"), "approve", otp_verified_at=fresh())
    outcome = decide(
        req.pk, make_user("bob"), "reject", comment="unexpected file", otp_verified_at=fresh()
    )
    assert outcome.request.state == "rejected"
    with pytest.raises(SigningRefused, match="the request is rejected"):
        decide(req.pk, make_user("erin"), "approve", otp_verified_at=fresh())
    assert not Signature.objects.exists()
    assert AuditEntry.objects.filter(action="signing_request.rejected").count() == 1


def test_an_expired_request_cannot_be_approved(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    SigningRequest.objects.filter(pk=req.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with pytest.raises(SigningRefused) as exc:
        decide(req.pk, make_user("alice"), "approve", otp_verified_at=fresh())
    assert exc.value.code == "expired"
    assert SigningRequest.objects.get(pk=req.pk).state == "expired"
    assert Approval.objects.count() == 0


@pytest.mark.parametrize("age", [None, timedelta(minutes=5, seconds=1)])
def test_an_approval_needs_a_fresh_second_factor(
    pending_request: Any, make_user: Any, age: Any
) -> None:
    req = pending_request()
    verified = None if age is None else timezone.now() - age
    with pytest.raises(SigningRefused) as exc:
        decide(req.pk, make_user("alice"), "approve", otp_verified_at=verified)
    assert exc.value.code == "second_factor_required"
    assert Approval.objects.count() == 0


def test_an_outsider_cannot_decide(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    for user in (make_user("carol", approves=()), make_user("sam", approves=("staging",))):
        with pytest.raises(SigningRefused) as exc:
            decide(req.pk, user, "approve", otp_verified_at=fresh())
        assert exc.value.status == 404


def test_approvals_count_only_for_the_policy_they_were_given_for(
    pending_request: Any, make_user: Any, settings: Any, tmp_path: Any
) -> None:
    req = pending_request()
    decide(req.pk, make_user("alice"), "approve", otp_verified_at=fresh())
    # The policy file changes (same rules, new bytes): alice's approval no longer counts.
    changed = tmp_path / "policy.yaml"
    changed.write_bytes(open(settings.SIGNING_POLICY_FILE, "rb").read() + b"\n# edited\n")
    settings.SIGNING_POLICY_FILE = str(changed)
    outcome = decide(req.pk, make_user("bob"), "approve", otp_verified_at=fresh())
    assert outcome.request.state == "pending_approval"
    assert outcome.approvals_received == 1


def test_a_changed_statement_is_not_signed(pending_request: Any, make_user: Any) -> None:
    """If the stored manifest is altered after approval, the digest check stops signing."""
    req = pending_request()
    decide(req.pk, make_user("alice"), "approve", otp_verified_at=fresh())
    resources = req.resources
    resources[0]["digest"] = "0" * 64
    SigningRequest.objects.filter(pk=req.pk).update(resources=resources)
    outcome = decide(req.pk, make_user("bob"), "approve", otp_verified_at=fresh())
    assert outcome.request.state == "failed"
    assert "no longer matches its digest" in outcome.request.failure_reason
    assert not Signature.objects.exists()


def test_approvers_are_emailed_when_a_request_waits(pending_request: Any, make_user: Any) -> None:
    make_user("alice")
    make_user("carol", approves=())
    mail.outbox.clear()
    req = pending_request()
    assert [m.to for m in mail.outbox] == [["alice@company.com"]]
    assert f"/requests/{req.pk}/" in mail.outbox[0].body
