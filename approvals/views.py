"""The approver web UI: dashboard, request page with diff, decisions, TOTP enrolment, history.

Every view scopes its queryset to the user's approver authorities: a user in no approver
group sees no request and gets 404 for any request URL.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from typing import Any

import qrcode
import qrcode.image.svg
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from approvals.groups import approver_authorities, identity_of
from approvals.models import Approval, Decision
from approvals.services import decide, is_own_request, valid_approvals
from signing_service.models import RequestState, SigningRequest
from signing_service.policy import current_policy
from signing_service.signing import SigningRefused

PAGE_SIZE = 25
LIST_FIELDS = ("id", "authority", "model_name", "model_version", "requester", "actor", "state",
               "created_at", "expires_at", "required_approvals", "statement_digest")  # fmt: skip
OTP_SESSION_KEY = "otp_verified_at"


def visible_requests(user: Any) -> QuerySet[SigningRequest]:
    return SigningRequest.objects.filter(authority__in=approver_authorities(user))


def _listing(user: Any, states: Q) -> QuerySet[SigningRequest]:
    # Only the listed columns, never the resource list; ordered by the index's columns.
    return visible_requests(user).filter(states).only(*LIST_FIELDS).order_by("-created_at", "-id")


def _page(request: HttpRequest, qs: QuerySet[SigningRequest]) -> Any:
    """One page plus its approval counts: three queries whether 10 or 10,000 are pending.

    The counts are fetched for the page's rows only; a GROUP BY over the whole listing
    would have to aggregate every pending request before the LIMIT applies.
    """
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = list(page.object_list)
    counts = dict(
        Approval.objects.filter(request__in=[r.pk for r in rows], decision=Decision.APPROVE)
        .values_list("request")
        .annotate(n=Count("id"))
    )
    for row in rows:
        row.approvals_received = counts.get(row.pk, 0)
    page.object_list = rows
    return page


def _has_device(user: Any) -> bool:
    return TOTPDevice.objects.filter(user=user, confirmed=True).exists()


@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    page = _page(request, _listing(request.user, Q(state=RequestState.PENDING_APPROVAL)))
    context = {
        "page": page,
        "authorities": approver_authorities(request.user),
        "has_device": _has_device(request.user),
        "now": timezone.now(),
    }
    return render(request, "approvals/dashboard.html", context)


@login_required
@require_GET
def history(request: HttpRequest) -> HttpResponse:
    page = _page(request, _listing(request.user, ~Q(state=RequestState.PENDING_APPROVAL)))
    return render(request, "approvals/history.html", {"page": page})


def _get_visible(user: Any, pk: Any) -> SigningRequest:
    req = visible_requests(user).filter(pk=pk).first()
    if req is None:
        raise Http404("no such signing request")
    return req


def resource_diff(req: SigningRequest) -> tuple[SigningRequest | None, dict[str, list[Any]]]:
    """Files added, removed and changed against the last signed version of the same model."""
    previous = (
        SigningRequest.objects.filter(
            model_name=req.model_name,
            authority=req.authority,
            state=RequestState.SIGNED,
            created_at__lt=req.created_at,
        )
        .order_by("-created_at")
        .first()
    )
    now = {r["name"]: r["digest"] for r in req.resources}
    before = {r["name"]: r["digest"] for r in previous.resources} if previous else {}
    diff = {
        "added": sorted(set(now) - set(before)),
        "removed": sorted(set(before) - set(now)),
        "changed": sorted(
            (n, before[n], now[n]) for n in set(now) & set(before) if now[n] != before[n]
        ),
        "unchanged": [n for n in now if before.get(n) == now[n]],
    }
    return previous, diff


@login_required
@require_GET
def request_detail(request: HttpRequest, pk: Any) -> HttpResponse:
    req = _get_visible(request.user, pk)
    previous, diff = resource_diff(req)
    decisions = list(Approval.objects.filter(request=req).select_related("approver"))
    policy_digest = current_policy().digest
    mine = next(
        (
            d
            for d in decisions
            if d.approver_id == request.user.pk and d.policy_digest == policy_digest
        ),
        None,
    )
    context = {
        "req": req,
        "previous": previous,
        "diff": diff,
        "decisions": decisions,
        "valid_count": valid_approvals(req).count(),
        "own": is_own_request(request.user, req),
        "mine": mine,
        "can_decide": req.state == RequestState.PENDING_APPROVAL
        and mine is None
        and not is_own_request(request.user, req),
        "has_device": _has_device(request.user),
        "otp_fresh": _otp_verified_at(request) is not None,
        "expired": req.expires_at is not None and req.expires_at <= timezone.now(),
    }
    return render(request, "approvals/request_detail.html", context)


def _otp_verified_at(request: HttpRequest) -> datetime | None:
    raw = request.session.get(OTP_SESSION_KEY)
    if not raw:
        return None
    verified = datetime.fromisoformat(raw)
    from django.conf import settings

    age = (timezone.now() - verified).total_seconds()
    return verified if age <= settings.APPROVAL_OTP_MAX_AGE_SECONDS else None


def verify_otp(request: HttpRequest, token: str) -> bool:
    """Check a TOTP code against the user's confirmed devices; remember when it passed."""
    token = token.strip().replace(" ", "")
    for device in TOTPDevice.objects.filter(user=request.user, confirmed=True):
        if device.verify_is_allowed()[0] and device.verify_token(token):
            otp_login(request, device)
            request.session[OTP_SESSION_KEY] = timezone.now().isoformat()
            return True
    return False


@login_required
@require_POST
def decide_view(request: HttpRequest, pk: Any) -> HttpResponseRedirect:
    req = _get_visible(request.user, pk)
    decision = request.POST.get("decision", "")
    token = request.POST.get("otp_token", "")
    if token and not verify_otp(request, token):
        messages.error(request, "That authenticator code is not valid (or was already used).")
        return redirect("approvals:request", pk=req.pk)
    try:
        outcome = decide(
            req.pk, request.user, decision,
            comment=request.POST.get("comment", ""), otp_verified_at=_otp_verified_at(request),
        )  # fmt: skip
    except SigningRefused as exc:
        messages.error(request, exc.message)
    else:
        verb = "approved" if decision == Decision.APPROVE else "rejected"
        messages.success(request, f"You {verb} this request. It is now {outcome.request.state}.")
    return redirect("approvals:request", pk=req.pk)


def _qr_svg(url: str) -> str:
    image = qrcode.make(url, image_factory=qrcode.image.svg.SvgPathImage, box_size=8)
    buffer = io.BytesIO()
    image.save(buffer)
    return buffer.getvalue().decode()


@login_required
@require_http_methods(["GET", "POST"])
def otp_setup(request: HttpRequest) -> HttpResponse:
    if _has_device(request.user):
        messages.info(request, "Your authenticator is already set up.")
        return redirect("approvals:dashboard")
    device, _ = TOTPDevice.objects.get_or_create(
        user=request.user, confirmed=False, defaults={"name": "authenticator"}
    )
    if request.method == "POST":
        if device.verify_token(request.POST.get("otp_token", "").strip()):
            device.confirmed = True
            device.save(update_fields=["confirmed"])
            otp_login(request, device)
            request.session[OTP_SESSION_KEY] = timezone.now().isoformat()
            messages.success(request, "Authenticator set up. You can now approve requests.")
            return redirect("approvals:dashboard")
        messages.error(request, "That code did not match; check the time on your device.")
    context = {
        "qr_svg": _qr_svg(device.config_url),
        "secret": base64.b32encode(device.bin_key).decode().rstrip("="),
        "identity": identity_of(request.user),
    }
    return render(request, "approvals/otp_setup.html", context)


def request_page_url(request: HttpRequest, req: SigningRequest) -> str:
    return request.build_absolute_uri(reverse("approvals:request", args=[req.pk]))
