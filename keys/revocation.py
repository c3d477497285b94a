"""The revocation runbook (SPEC section 9): immediate, one custodian suffices.

In one transaction: the key becomes ``revoked`` with its effective time, every valid
signature it made at or after that time becomes ``quarantined`` (one UPDATE, however many
there are), and an incident is opened, all audited. Only after the commit do the
notifications go out (a webhook with an HMAC-SHA256 signature header, and email to the
authority's custodians), so a failed notification never undoes a revocation. Only
signatures this service issued (rows in its database) are ever touched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.request
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from approvals.groups import custodian_group
from keys.lifecycle import transition
from keys.models import Incident, KeyState
from signing_service import audit
from signing_service.models import Signature, SignatureState

logger = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Modelsign-Signature"


def revoke(key_id: int, *, reason: str, effective_at: datetime | None, actor: str) -> Incident:
    """Revoke, quarantine and open the incident atomically; then notify."""
    effective = effective_at or timezone.now()
    with transaction.atomic():
        key = transition(
            key_id, KeyState.REVOKED, actor=actor, reason=reason, effective_at=effective
        )
        quarantined = Signature.objects.filter(
            key=key, state=SignatureState.VALID, signed_at__gte=effective
        ).update(state=SignatureState.QUARANTINED)
        incident = Incident.objects.create(
            key=key, reason=reason, effective_at=effective, opened_by=actor, quarantined=quarantined
        )
        audit.record(
            actor,
            "incident.opened",
            target=incident,
            data={"key": key.hint, "authority": key.authority, "reason": reason,
                  "effective_at": effective.isoformat(), "quarantined": quarantined},
        )  # fmt: skip
        transaction.on_commit(lambda: notify(incident.pk))
    return incident


def incident_message(incident: Incident) -> dict[str, Any]:
    key = incident.key
    return {
        "event": "key.revoked",
        "incident": str(incident.pk),
        "authority": key.authority,
        "key_hint": key.hint,
        "reason": incident.reason,
        "effective_at": incident.effective_at.isoformat(),
        "quarantined_signatures": incident.quarantined,
        "opened_by": incident.opened_by,
        "opened_at": incident.opened_at.isoformat(),
    }


def sign_webhook(body: bytes, secret: str) -> str:
    """``sha256=<hex>`` HMAC of the exact body, as receivers recompute it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notify(incident_id: Any) -> list[dict[str, Any]]:
    """Send the webhook and the custodian emails; record each outcome on the incident."""
    incident = Incident.objects.select_related("key").get(pk=incident_id)
    message = incident_message(incident)
    results = [r for r in (_webhook(message), _email(incident, message)) if r is not None]
    with transaction.atomic():
        locked = Incident.objects.select_for_update().get(pk=incident_id)
        locked.notifications = [*locked.notifications, *results]
        locked.save(update_fields=["notifications"])
        audit.record(
            "signing-service", "incident.notified", target=locked, data={"results": results}
        )
    return results


def _webhook(message: dict[str, Any]) -> dict[str, Any] | None:
    url = settings.INCIDENT_WEBHOOK_URL
    if not url:
        return None
    body = json.dumps(message, sort_keys=True).encode()
    headers = {"Content-Type": "application/json"}
    if settings.INCIDENT_WEBHOOK_SECRET:
        headers[SIGNATURE_HEADER] = sign_webhook(body, settings.INCIDENT_WEBHOOK_SECRET)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - URL from settings
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            ok, detail = 200 <= response.status < 300, f"HTTP {response.status}"
    except OSError as exc:
        ok, detail = False, str(exc)
    if not ok:
        logger.error("incident webhook to %s failed: %s", url, detail)
    return {
        "channel": "webhook",
        "to": url,
        "ok": ok,
        "detail": detail,
        "at": timezone.now().isoformat(),
    }


def _email(incident: Incident, message: dict[str, Any]) -> dict[str, Any] | None:
    users = (
        get_user_model()
        .objects.filter(groups__name=custodian_group(incident.key.authority), is_active=True)
        .exclude(email="")
    )
    recipients = sorted({u.email for u in users})
    if not recipients:
        return None
    subject = f"[modelsign] {incident.key.authority} key {incident.key.fingerprint} revoked ({incident.reason})"
    body = json.dumps(message, indent=2)
    sent = send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=True)
    return {"channel": "email", "to": recipients, "ok": bool(sent), "detail": f"{sent} sent",
            "at": timezone.now().isoformat()}  # fmt: skip
