"""The approval rules (SPEC section 8). Views and the API only call :func:`decide`.

Every rule is enforced here, inside one transaction that locks the request row, so no
view, API client or race can get around them:

* the approver is in the authority's approver group;
* nobody approves a request they submitted or triggered (requester identity, CI actor);
* a fresh second factor (verified at most ``APPROVAL_OTP_MAX_AGE_SECONDS`` ago);
* one decision per person (409 for a second one); one rejection rejects the request;
* an expired request cannot be decided;
* approvals count only for the statement digest and policy version they were given for;
* reaching the quorum moves the request to ``approved`` with a conditional UPDATE whose
  row count is checked, so two approvals landing together sign it exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mass_mail
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.urls import reverse
from django.utils import timezone

from approvals.groups import approver_authorities, approver_group, identity_of
from approvals.models import Approval, Decision
from signing_service import audit
from signing_service.models import RequestState, SigningRequest
from signing_service.policy import current_policy
from signing_service.signing import SigningRefused, sign_or_enqueue


@dataclass(frozen=True)
class Outcome:
    request: SigningRequest
    approval: Approval
    approvals_received: int


def valid_approvals(req: SigningRequest) -> QuerySet[Approval]:
    """Approvals that count now: same statement digest and the current policy version."""
    return Approval.objects.filter(
        request=req,
        decision=Decision.APPROVE,
        statement_digest=req.statement_digest,
        policy_digest=current_policy().digest,
    ).order_by("decided_at")


def is_own_request(user: Any, req: SigningRequest) -> bool:
    """Whether ``user`` submitted or triggered ``req`` (fail closed on any name match)."""
    names = {n.casefold() for n in (user.username, user.email) if n}
    if user.email:
        names.add(user.email.split("@", 1)[0].casefold())
    claimed = {n.casefold() for n in (req.requester, req.actor) if n}
    return bool(names & claimed)


def check_fresh_otp(otp_verified_at: datetime | None) -> datetime:
    max_age = timedelta(seconds=settings.APPROVAL_OTP_MAX_AGE_SECONDS)
    if otp_verified_at is None or timezone.now() - otp_verified_at > max_age:
        minutes = settings.APPROVAL_OTP_MAX_AGE_SECONDS // 60
        raise SigningRefused(
            "second_factor_required",
            f"confirm with a fresh authenticator code (verified within the last {minutes} minutes)",
            status=403,
        )
    return otp_verified_at


def decide(
    request_id: Any,
    user: Any,
    decision: str,
    *,
    comment: str = "",
    otp_verified_at: datetime | None,
) -> Outcome:
    """Record one person's decision; sign the request if it completes the quorum."""
    if decision not in Decision.values:
        raise SigningRefused("invalid", "decision must be 'approve' or 'reject'")
    verified_at = check_fresh_otp(otp_verified_at)
    try:
        with transaction.atomic():
            # The row lock makes concurrent decisions on one request take turns, so the
            # quorum count below sees every earlier approval.
            req = SigningRequest.objects.select_for_update().filter(pk=request_id).first()
            req = _check_may_decide(req, user)
            approval = _record(req, user, decision, comment, verified_at)
            received = valid_approvals(req).count()
            if decision == Decision.REJECT:
                _move(req, RequestState.REJECTED, user, "signing_request.rejected")
            elif received >= req.required_approvals:
                _move(req, RequestState.APPROVED, user, "signing_request.approved")
    except SigningRefused as exc:
        if exc.code == "expired":
            _expire(request_id)  # its own transaction: the refusal above rolled back
        raise
    req.refresh_from_db()
    if req.state == RequestState.APPROVED:
        req = sign_or_enqueue(req.pk)
    return Outcome(req, approval, received)


def _check_may_decide(req: SigningRequest | None, user: Any) -> SigningRequest:
    if req is None or req.authority not in approver_authorities(user):
        # Outsiders learn nothing, not even whether the request exists.
        raise SigningRefused("not_found", "no such signing request", status=404)
    if req.state != RequestState.PENDING_APPROVAL:
        raise SigningRefused(
            "not_pending", f"the request is {req.state}; only pending requests can be decided",
            status=409,
        )  # fmt: skip
    if req.expires_at is not None and req.expires_at <= timezone.now():
        raise SigningRefused("expired", "the request expired before it was approved", status=409)
    if is_own_request(user, req):
        raise SigningRefused(
            "self_approval", "you submitted or triggered this request; someone else must decide",
            status=403,
        )  # fmt: skip
    return req


def _record(
    req: SigningRequest, user: Any, decision: str, comment: str, verified_at: datetime
) -> Approval:
    policy_digest = current_policy().digest
    if Approval.objects.filter(request=req, approver=user, policy_digest=policy_digest).exists():
        raise SigningRefused(
            "already_decided", "you have already decided on this request", status=409
        )
    try:
        with transaction.atomic():
            approval = Approval.objects.create(
                request=req,
                approver=user,
                approver_identity=identity_of(user),
                decision=decision,
                comment=comment[:2000],
                statement_digest=req.statement_digest,
                policy_digest=policy_digest,
                decided_at=timezone.now(),
                otp_verified_at=verified_at,
            )
    except IntegrityError:
        raise SigningRefused(
            "already_decided", "you have already decided on this request", status=409
        ) from None
    audit.record(
        identity_of(user),
        f"approval.{decision}",
        target=req,
        data={"statement_digest": req.statement_digest, "policy_digest": policy_digest,
              "comment": comment[:200], "otp_verified_at": verified_at.isoformat()},
    )  # fmt: skip
    return approval


def _move(req: SigningRequest, state: str, user: Any, action: str) -> None:
    moved = SigningRequest.objects.filter(pk=req.pk, state=RequestState.PENDING_APPROVAL).update(
        state=state, updated_at=timezone.now()
    )
    if moved != 1:
        raise IntegrityError("the request left pending_approval during the decision")
    audit.record(identity_of(user), action, target=req, data={"state": state})


def _expire(request_id: Any) -> None:
    with transaction.atomic():
        moved = SigningRequest.objects.filter(
            pk=request_id, state=RequestState.PENDING_APPROVAL, expires_at__lte=timezone.now()
        ).update(state=RequestState.EXPIRED, updated_at=timezone.now())
        if moved:
            req = SigningRequest.objects.get(pk=request_id)
            audit.record("signing-service", "signing_request.expired", target=req)


def approvals_for_statement(req: SigningRequest) -> list[dict[str, str]]:
    """What travels in the signed predicate: who approved and when."""
    return approvals_for_statements([req])[req.pk]


def approvals_for_statements(
    reqs: Iterable[SigningRequest],
) -> dict[Any, list[dict[str, str]]]:
    """:func:`approvals_for_statement` for many requests (a re-sign chunk) in one query:
    the approvals :func:`valid_approvals` counts, per request id, oldest first."""
    digests = {req.pk: req.statement_digest for req in reqs}
    found: dict[Any, list[dict[str, str]]] = {pk: [] for pk in digests}
    approvals = Approval.objects.filter(
        request_id__in=list(digests),
        decision=Decision.APPROVE,
        policy_digest=current_policy().digest,
    ).order_by("decided_at")
    for a in approvals:
        if a.statement_digest == digests[a.request_id]:
            found[a.request_id].append(
                {"approver": a.approver_identity, "decided_at": a.decided_at.isoformat()}
            )
    return found


def notify_approvers(req: SigningRequest, request_url: str) -> int:
    """Email the authority's approvers (except the requester) that a request waits for them."""
    users = (
        get_user_model()
        .objects.filter(groups__name=approver_group(req.authority), is_active=True)
        .exclude(email="")
    )
    subject = f"[modelsign] approve {req.model_name} {req.model_version} for {req.authority}"
    body = (
        f"{req.requester} asks to sign {req.model_name} {req.model_version} with the "
        f"{req.authority} key ({req.required_approvals} approvals needed).\n\n"
        f"Statement digest: {req.statement_digest}\nReview: {request_url}\n"
    )
    messages = [
        (subject, body, settings.DEFAULT_FROM_EMAIL, [u.email])
        for u in users
        if not is_own_request(u, req)
    ]
    return send_mass_mail(messages, fail_silently=True) if messages else 0


def request_page_path(req: SigningRequest) -> str:
    return reverse("approvals:request", args=[req.pk])
