"""Custodian pages: keys per authority, ceremonies, and the audit log.

Scoped like the approver pages: a user sees the keys and ceremonies of the authorities
they are a custodian for, and nothing at all otherwise.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from approvals.groups import identity_of
from approvals.services import check_fresh_otp
from approvals.views import _otp_verified_at, verify_otp
from keys import ceremonies, rotation
from keys.lifecycle import KeyStateError
from keys.models import CeremonyState, Incident, KeyCeremony, SigningKey
from keys.revocation import revoke
from signing_service.models import AuditEntry, Signature
from signing_service.signing import SigningRefused


def _authorities(request: HttpRequest) -> list[str]:
    authorities = ceremonies.custodian_authorities(request.user)
    if not authorities:
        raise Http404("you are not a key custodian")
    return authorities


@login_required
@require_GET
def keys_page(request: HttpRequest) -> HttpResponse:
    authorities = _authorities(request)
    now = timezone.now()
    keys = list(SigningKey.objects.filter(authority__in=authorities).exclude(state="pending"))
    for key in keys:
        key.days_left = (key.not_after - now).days if key.not_after else None  # type: ignore[attr-defined]
    open_ceremonies = (
        KeyCeremony.objects.filter(authority__in=authorities, state=CeremonyState.OPEN)
        .select_related("opened_by", "replaces")
        .prefetch_related("confirmations")
    )
    recent = KeyCeremony.objects.filter(authority__in=authorities).exclude(
        state=CeremonyState.OPEN
    )[:10]
    context = {
        "authorities": authorities,
        "keys": keys,
        "open": open_ceremonies,
        "recent": recent,
        "incidents": Incident.objects.filter(key__authority__in=authorities).select_related("key")[
            :20
        ],
        "now": now,
        "rotation": rotation.notices(authorities, now),
    }
    return render(request, "keys/custodian.html", context)


def _act(request: HttpRequest, action: Any) -> HttpResponseRedirect:
    token = request.POST.get("otp_token", "")
    if token and not verify_otp(request, token):
        messages.error(request, "That authenticator code is not valid (or was already used).")
        return redirect("keys:custodian")
    try:
        text = action(_otp_verified_at(request))
    except SigningRefused as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, text)
    return redirect("keys:custodian")


@login_required
@require_POST
def open_view(request: HttpRequest) -> HttpResponseRedirect:
    authority = request.POST.get("authority", "")
    if authority not in _authorities(request):
        raise Http404("you are not a key custodian for that authority")
    purpose = request.POST.get("purpose", "create")
    key = None
    if purpose == "destroy":
        key = SigningKey.objects.filter(
            pk=request.POST.get("key") or 0, authority=authority
        ).first()
        if key is None:
            raise Http404("no such key")

    def act(verified: Any) -> str:
        c = ceremonies.open_ceremony(
            authority, request.user, otp_verified_at=verified, note=request.POST.get("note", ""),
            purpose=purpose, key=key,
        )  # fmt: skip
        return (
            f"Ceremony to {c.purpose} a {authority} key opened: 1 of {c.quorum} custodians. "
            "Ask another custodian to confirm."
        )

    return _act(request, act)


@login_required
@require_POST
def confirm_view(request: HttpRequest, pk: Any) -> HttpResponseRedirect:
    _ceremony_for(request, pk)

    def act(verified: Any) -> str:
        c = ceremonies.confirm(pk, request.user, otp_verified_at=verified)
        if c.state == "completed" and c.purpose == "destroy":
            return f"Ceremony complete: {c.authority} key {c.key.fingerprint} destroyed on the backend."
        if c.key is not None:
            return f"Ceremony complete: new active {c.authority} key {c.key.fingerprint}."
        return f"Confirmed: {c.confirmations.count()} of {c.quorum} custodians."

    return _act(request, act)


@login_required
@require_POST
def abort_view(request: HttpRequest, pk: Any) -> HttpResponseRedirect:
    _ceremony_for(request, pk)
    return _act(
        request,
        lambda _: f"Ceremony {ceremonies.abort(pk, request.user, 'aborted in the UI').pk} aborted.",
    )


def _ceremony_for(request: HttpRequest, pk: Any) -> KeyCeremony:
    ceremony = KeyCeremony.objects.filter(pk=pk, authority__in=_authorities(request)).first()
    if ceremony is None:
        raise Http404("no such ceremony")
    return ceremony


@login_required
@require_GET
def audit_page(request: HttpRequest) -> HttpResponse:
    _authorities(request)
    entries = AuditEntry.objects.order_by("-seq")
    filters = {k: request.GET.get(k, "").strip() for k in ("action", "actor", "target")}
    if filters["action"]:
        entries = entries.filter(action__startswith=filters["action"])
    if filters["actor"]:
        entries = entries.filter(actor=filters["actor"])
    if filters["target"]:
        entries = entries.filter(target_id=filters["target"])
    page = Paginator(entries, 50).get_page(request.GET.get("page"))
    query = "&".join(f"{k}={v}" for k, v in filters.items() if v)
    return render(request, "keys/audit.html", {"page": page, "filters": filters, "query": query})


@login_required
@require_POST
def revoke_view(request: HttpRequest, pk: int) -> HttpResponseRedirect:
    """Revocation is immediate and needs one custodian, with a fresh second factor."""
    key = SigningKey.objects.filter(pk=pk, authority__in=_authorities(request)).first()
    if key is None:
        raise Http404("no such key")
    token = request.POST.get("otp_token", "")
    if token and not verify_otp(request, token):
        messages.error(request, "That authenticator code is not valid (or was already used).")
        return redirect("keys:custodian")
    try:
        check_fresh_otp(_otp_verified_at(request))
        effective = _effective_at(request.POST.get("effective_at", ""))
        incident = revoke(
            key.pk, reason=request.POST.get("reason", "compromised")[:64], effective_at=effective,
            actor=identity_of(request.user),
        )  # fmt: skip
    except (SigningRefused, KeyStateError, ValueError) as exc:
        messages.error(request, getattr(exc, "message", str(exc)))
        return redirect("keys:custodian")
    messages.success(
        request, f"Key {key.fingerprint} revoked; {incident.quarantined} signatures quarantined."
    )
    return redirect("keys:incident", pk=incident.pk)


def _effective_at(raw: str) -> Any:
    if not raw.strip():
        return None
    when = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # the form says UTC
    if when > timezone.now():
        raise ValueError(
            "the effective time is in the future; revocation takes effect now or earlier"
        )
    return when


@login_required
@require_GET
def incident_page(request: HttpRequest, pk: Any) -> HttpResponse:
    incident = (
        Incident.objects.filter(pk=pk, key__authority__in=_authorities(request))
        .select_related("key")
        .first()
    )
    if incident is None:
        raise Http404("no such incident")
    affected = Signature.objects.filter(key=incident.key, signed_at__gte=incident.effective_at)
    by_state = dict(affected.values_list("state").annotate(n=Count("id")).order_by())
    models = affected.values("request__model_name", "request__model_version", "state").order_by(
        "request__model_name", "request__model_version"
    )[:500]
    context = {
        "incident": incident,
        "by_state": by_state,
        "models": models,
        "total": sum(by_state.values()),
    }
    return render(request, "keys/incident.html", context)
