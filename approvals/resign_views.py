"""The re-sign batch page: approvers of the batch's authority inspect it and decide.

Mirrors the request page: scoped to the user's approver authorities (404 for everyone
else), decisions POST only, CSRF protected, with a fresh authenticator code. The rules
themselves live in :mod:`keys.resigning`.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from approvals.views import _has_device, _otp_verified_at, verify_otp
from keys import resigning
from keys.models import ResignBatch, ResignDecision
from signing_service.signing import SigningRefused


def _get_visible(user: Any, pk: Any) -> ResignBatch:
    batch = (
        resigning.visible_batches(user)
        .filter(pk=pk)
        .select_related("old_key", "new_key", "incident")
        .first()
    )
    if batch is None:
        raise Http404("no such re-sign batch")
    return batch


@login_required
@require_GET
def batch_detail(request: HttpRequest, pk: Any) -> HttpResponse:
    batch = _get_visible(request.user, pk)
    decisions = list(ResignDecision.objects.filter(batch=batch).select_related("approver"))
    mine = next((d for d in decisions if d.approver_id == request.user.pk), None)
    context = {
        "batch": batch,
        "progress": resigning.progress(batch),
        "decisions": decisions,
        "approvals": sum(1 for d in decisions if d.approve),
        "needed": resigning.approvals_needed(batch),
        "mine": mine,
        "can_decide": batch.state == ResignBatch.State.PENDING_APPROVAL and mine is None,
        "has_device": _has_device(request.user),
        "otp_fresh": _otp_verified_at(request) is not None,
        "models_capped": len(batch.models_summary) >= resigning.MODELS_SUMMARY_CAP,
    }
    return render(request, "approvals/resign_batch.html", context)


@login_required
@require_POST
def batch_decide(request: HttpRequest, pk: Any) -> HttpResponseRedirect:
    batch = _get_visible(request.user, pk)
    decision = request.POST.get("decision", "")
    if decision not in ("approve", "reject"):
        messages.error(request, "Choose approve or reject.")
        return redirect("approvals:resign-batch", pk=batch.pk)
    token = request.POST.get("otp_token", "")
    if token and not verify_otp(request, token):
        messages.error(request, "That authenticator code is not valid (or was already used).")
        return redirect("approvals:resign-batch", pk=batch.pk)
    try:
        outcome = resigning.decide(
            batch.pk, request.user, approve=decision == "approve",
            comment=request.POST.get("comment", ""), otp_verified_at=_otp_verified_at(request),
        )  # fmt: skip
    except SigningRefused as exc:
        messages.error(request, exc.message)
    else:
        verb = "approved" if decision == "approve" else "rejected"
        state = outcome.batch.get_state_display().lower()
        messages.success(request, f"You {verb} this re-sign batch. It is now {state}.")
    return redirect("approvals:resign-batch", pk=batch.pk)
