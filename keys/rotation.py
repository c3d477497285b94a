"""Scheduled key rotation (SPEC section 9), run by Celery beat (``worker/tasks/rotation.py``).

For every key-based authority of the policy (pkcs11 and vault), one run:

* marks open ceremonies past their deadline as expired (which frees the authority for a new one);
* once a new key is active, asks :func:`keys.resigning.plan_for_authority` to plan
  re-signing the older keys' signatures that need it (those of the key in ``transition``);
* retires ``transition`` keys whose ``transition_days`` are over;
* ``rotation_lead_days`` before the active key's ``not_after``, opens a rotation ceremony
  (:func:`keys.ceremonies.open_rotation_ceremony`) and emails the custodians, once;
* reports an active key past its ``not_after`` with no successor (audit + email, once). Such
  a key already signs nothing (:meth:`SigningKey.can_sign`); requests wait for a new key.

Every step may run twice or concurrently: each one re-checks its condition under a row lock,
a conditional UPDATE or a unique constraint, so it happens once. :func:`due` lists what a run
would do without doing it (``manage.py rotation_check --dry-run``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from approvals.groups import custodian_group
from keys import ceremonies
from keys.lifecycle import KeyStateError, transition
from keys.models import CeremonyPurpose, CeremonyState, KeyCeremony, KeyState, SigningKey
from signing_service import audit
from signing_service.models import (
    AuditEntry,
    RequestState,
    Signature,
    SignatureState,
    SigningRequest,
)
from signing_service.policy import KeyManagement, current_policy

log = logging.getLogger(__name__)

ACTOR = ceremonies.SYSTEM_ACTOR
EXPIRED_ACTION = "key.expired_without_successor"

# What a run does, in the order it does it for each authority.
EXPIRE_CEREMONY = "ceremony_expired"
PLAN_RESIGN = "resign_planned"
RETIRE = "retired"
ROTATION_DUE = "rotation_due"
EXPIRED = "expired_without_successor"
KINDS = (EXPIRE_CEREMONY, PLAN_RESIGN, RETIRE, ROTATION_DUE, EXPIRED)


@dataclass(frozen=True)
class Due:
    """One thing a run should do: ``kind`` for ``authority``, about a key or a ceremony."""

    kind: str
    authority: str
    target: Any  # a key id, or a ceremony id for EXPIRE_CEREMONY
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"authority": self.authority, "target": str(self.target), "detail": self.detail}


# --- what is due -----------------------------------------------------------------------


def due(now: datetime | None = None) -> list[Due]:
    """Everything a run at ``now`` would do, per authority in the order :func:`run` does it."""
    now = now or timezone.now()
    policy = current_policy()
    found: list[Due] = []
    for name, authority in sorted(policy.authorities.items()):
        if authority.backend in ceremonies.KEY_BACKENDS:
            found += _due_for(name, policy.key_management, now)
    return found


def _due_for(authority: str, km: KeyManagement, now: datetime) -> list[Due]:
    keys = list(SigningKey.objects.filter(authority=authority))
    active = next((k for k in keys if k.state == KeyState.ACTIVE), None)
    in_transition = [k for k in keys if k.state == KeyState.TRANSITION]
    found = _overdue_ceremonies(authority, now)
    if active is not None and active.can_sign(now):  # an expired key cannot re-sign either
        found += _resign_due(authority, active)
    found += _retire_due(authority, in_transition, km, now)
    if active is not None and active.not_after is not None:
        if now >= active.not_after:
            found += _expired_due(active)
        elif now >= active.not_after - timedelta(days=km.rotation_lead_days):
            found += _rotation_due(active, now)
    return found


def _overdue_ceremonies(authority: str, now: datetime) -> list[Due]:
    overdue = KeyCeremony.objects.filter(
        authority=authority, state=CeremonyState.OPEN, expires_at__lte=now
    )
    return [
        Due(EXPIRE_CEREMONY, authority, c.pk, f"{c.purpose} ceremony {c.pk} expired "
            f"{_day(c.expires_at)} with {c.confirmations.count()} of {c.quorum} confirmations")
        for c in overdue
    ]  # fmt: skip


def _resign_due(authority: str, active: SigningKey) -> list[Due]:
    """Ask for a plan while signatures of older keys still need the active key's.

    The same signatures :func:`keys.resigning.plan_for_authority` takes: valid ones of keys in
    transition (or retired before anyone planned), quarantined ones of revoked keys, that no
    batch for the active key covers yet. Once planned they are covered, so it asks once.
    """
    needing = (
        Signature.objects.filter(key__authority=authority)
        .exclude(key=active)
        .filter(
            Q(key__state__in=(KeyState.TRANSITION, KeyState.RETIRED), state=SignatureState.VALID)
            | Q(key__state=KeyState.REVOKED, state=SignatureState.QUARANTINED)
        )
        .exclude(resign_batch__new_key=active)
        .count()
    )
    if not needing:
        return []
    return [
        Due(PLAN_RESIGN, authority, active.pk,
            f"{needing} signature(s) of older {authority} keys to re-sign with {_name(active)}")
    ]  # fmt: skip


def _retire_due(
    authority: str, in_transition: list[SigningKey], km: KeyManagement, now: datetime
) -> list[Due]:
    window = timedelta(days=km.transition_days)
    found = []
    for key in in_transition:
        entered = transition_started(key)
        if entered is not None and entered + window <= now:
            found.append(
                Due(RETIRE, authority, key.pk,
                    f"{_name(key)} in transition since {_day(entered)}; "
                    f"its {km.transition_days}-day window ended {_day(entered + window)}")
            )  # fmt: skip
    return found


def transition_started(key: SigningKey) -> datetime | None:
    """When ``key`` entered transition: its column, or (keys moved before the column existed)
    the audit record of the move, which is where the trust document reads it from too."""
    if key.transitioned_at is not None:
        return key.transitioned_at
    return (
        AuditEntry.objects.filter(
            action=f"key.{KeyState.TRANSITION}", target_type="SigningKey", target_id=str(key.pk)
        )
        .order_by("-seq")
        .values_list("created_at", flat=True)
        .first()
    )


def _rotation_due(key: SigningKey, now: datetime) -> list[Due]:
    ceremony = _open_create_ceremony(key.authority, now)
    needs_ceremony = ceremony is None and not _rotation_aborted(key)
    if not needs_ceremony and key.rotation_due_notified_at is not None:
        return []
    what = "open a rotation ceremony and notify the custodians" if needs_ceremony else (
        "notify the custodians")  # fmt: skip
    return [
        Due(ROTATION_DUE, key.authority, key.pk,
            f"{_name(key)} expires {_day(key.not_after)}: {what}")
    ]  # fmt: skip


def _expired_due(key: SigningKey) -> list[Due]:
    if _expiry_reported(key):
        return []
    return [
        Due(EXPIRED, key.authority, key.pk,
            f"{_name(key)} expired {_day(key.not_after)} and no new key is active: "
            "report it and notify the custodians")
    ]  # fmt: skip


def _open_create_ceremony(authority: str, now: datetime) -> KeyCeremony | None:
    return KeyCeremony.objects.filter(
        authority=authority,
        purpose=CeremonyPurpose.CREATE,
        state=CeremonyState.OPEN,
        expires_at__gt=now,
    ).first()


def _rotation_aborted(key: SigningKey) -> bool:
    """Custodians aborted the job's ceremony for this key: they decide what comes next (the
    page keeps showing the rotation as due), the job does not reopen it every hour."""
    return KeyCeremony.objects.filter(
        replaces=key, opened_by__isnull=True, state=CeremonyState.ABORTED
    ).exists()


def _expiry_reported(key: SigningKey) -> bool:
    return AuditEntry.objects.filter(
        action=EXPIRED_ACTION, target_type="SigningKey", target_id=str(key.pk)
    ).exists()


# --- doing it --------------------------------------------------------------------------


def run(now: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """Do what is due at ``now`` (default: the current time); return what was done.

    The result maps each kind (``rotation_due``, ``expired_without_successor``, ``retired``,
    ``resign_planned``, ``ceremony_expired``) to ``[{authority, target, detail}]``, plus
    ``errors``: a failure for one authority is logged and reported, and the others go on.
    """
    now = now or timezone.now()
    report: dict[str, list[dict[str, Any]]] = {kind: [] for kind in (*KINDS, "errors")}
    for item in due(now):
        try:
            done = _HANDLERS[item.kind](item, now)
        except Exception as exc:  # one authority's HSM or Vault must not hold up the others
            log.exception("rotation: %s for %s failed", item.kind, item.authority)
            report["errors"].append({**item.to_json(), "kind": item.kind, "error": str(exc)})
            continue
        if done:
            report[item.kind].append(item.to_json())
    return report


def _expire_ceremony(item: Due, now: datetime) -> bool:
    return ceremonies.expire_overdue(item.target, now=now)


def _plan_resign(item: Due, now: datetime) -> bool:
    # Imported when needed: re-signing is its own module, and the job must not depend on
    # it just to retire keys or open ceremonies.
    resigning = importlib.import_module("keys.resigning")
    return bool(resigning.plan_for_authority(item.authority))


def _retire(item: Due, now: datetime) -> bool:
    window = current_policy().key_management.transition_days
    try:
        transition(
            item.target, KeyState.RETIRED, actor=ACTOR,
            reason=f"its {window}-day transition window ended",
        )  # fmt: skip
    except KeyStateError:
        return False  # retired or revoked by someone else since due() looked
    return True


def _open_rotation(item: Due, now: datetime) -> bool:
    with transaction.atomic():
        # Locked: two runs at once must not both announce the rotation.
        key = SigningKey.objects.select_for_update().get(pk=item.target)
        lead = timedelta(days=current_policy().key_management.rotation_lead_days)
        if key.state != KeyState.ACTIVE or key.not_after is None:
            return False
        if not key.not_after - lead <= now < key.not_after:
            return False
        ceremony = _open_create_ceremony(key.authority, now)
        opened = None
        if ceremony is None and not _rotation_aborted(key):
            opened = ceremony = ceremonies.open_rotation_ceremony(key, now=now)
        if key.rotation_due_notified_at is not None:
            return opened is not None
        key.rotation_due_notified_at = now
        key.save(update_fields=["rotation_due_notified_at"])
        audit.record(
            ACTOR, "key.rotation_due", target=key,
            data={"authority": key.authority, "hint": key.hint,
                  "not_after": key.not_after.isoformat(),
                  "ceremony": str(ceremony.pk) if ceremony else None},
        )  # fmt: skip
        subject, body = _due_message(key, ceremony)
        transaction.on_commit(lambda: notify_custodians(key.authority, subject, body))
    return True


def _report_expired(item: Due, now: datetime) -> bool:
    with transaction.atomic():
        # Locked: the audit record is the "already reported" mark; two runs must not both write it.
        key = SigningKey.objects.select_for_update().get(pk=item.target)
        if key.state != KeyState.ACTIVE or key.not_after is None or now < key.not_after:
            return False
        if _expiry_reported(key):
            return False
        waiting = SigningRequest.objects.filter(
            authority=key.authority, state=RequestState.APPROVED
        ).count()
        ceremony = _open_create_ceremony(key.authority, now)
        audit.record(
            ACTOR, EXPIRED_ACTION, target=key,
            data={"authority": key.authority, "hint": key.hint,
                  "not_after": key.not_after.isoformat(), "waiting_requests": waiting,
                  "ceremony": str(ceremony.pk) if ceremony else None},
        )  # fmt: skip
        subject, body = _expired_message(key, waiting, ceremony)
        transaction.on_commit(lambda: notify_custodians(key.authority, subject, body))
    return True


_HANDLERS: dict[str, Callable[[Due, datetime], bool]] = {
    EXPIRE_CEREMONY: _expire_ceremony,
    PLAN_RESIGN: _plan_resign,
    RETIRE: _retire,
    ROTATION_DUE: _open_rotation,
    EXPIRED: _report_expired,
}


# --- telling people --------------------------------------------------------------------


def notify_custodians(authority: str, subject: str, body: str) -> int:
    """Email the authority's active custodians; returns how many were sent.

    Runs after the commit: a mail server that is down never undoes what was recorded; the
    page and the audit log show it either way.
    """
    users = (
        get_user_model()
        .objects.filter(groups__name=custodian_group(authority), is_active=True)
        .exclude(email="")
    )
    recipients = sorted({u.email for u in users})
    if not recipients:
        log.warning("rotation: %s has no custodian with an email address to tell", authority)
        return 0
    sent = send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=True)
    if not sent:
        log.error("rotation: the email to %s's custodians was not sent: %s", authority, subject)
    return sent


def _page_url() -> str:
    return f"{settings.PUBLIC_URL}{reverse('keys:custodian')}"


def _due_message(key: SigningKey, ceremony: KeyCeremony | None) -> tuple[str, str]:
    subject = f"[modelsign] {key.authority} key {key.fingerprint} expires {_day(key.not_after)}: rotation due"
    if ceremony is not None:
        todo = (
            f"A rotation ceremony is open ({ceremony.pk}). It needs {ceremony.quorum} custodians, "
            f"each confirming with a fresh authenticator code, before {_day(ceremony.expires_at)}:\n"
            f"  on the custodian page {_page_url()}\n"
            f"  or: manage.py key_ceremony confirm {ceremony.pk} --user YOU --otp CODE\n"
            "The new key is generated when the last confirmation arrives; the current key then "
            "enters transition and its signatures are re-signed with the new key."
        )
    else:
        todo = (
            "No rotation ceremony is open (the last one was aborted). Open one on the custodian "
            f"page {_page_url()} or with manage.py key_ceremony open --authority {key.authority}."
        )
    body = (
        f"The {key.authority} signing key {key.fingerprint} ({key.backend}) expires on "
        f"{_day(key.not_after)}. After that it signs nothing and {key.authority} requests wait "
        f"until a new key is active.\n\n{todo}\n"
    )
    return subject, body


def _expired_message(
    key: SigningKey, waiting: int, ceremony: KeyCeremony | None
) -> tuple[str, str]:
    subject = f"[modelsign] {key.authority} key {key.fingerprint} expired with no successor"
    todo = (
        f"Confirm the open ceremony {ceremony.pk} ({_page_url()})."
        if ceremony is not None
        else f"Open a key ceremony: {_page_url()} or manage.py key_ceremony open "
        f"--authority {key.authority}, and ask a second custodian to confirm it."
    )
    body = (
        f"The {key.authority} signing key {key.fingerprint} expired on {_day(key.not_after)} and "
        f"no new key is active. Nothing is signed for {key.authority} until one is: "
        f"{waiting} approved request(s) are waiting now.\n\n{todo}\n"
    )
    return subject, body


@dataclass(frozen=True)
class Notice:
    """What the custodian page shows about a key due for rotation, or expired without one."""

    key: SigningKey
    expired: bool
    ceremony: KeyCeremony | None


def notices(authorities: Iterable[str], now: datetime | None = None) -> list[Notice]:
    """Active keys of ``authorities`` inside their rotation lead time, or past ``not_after``."""
    now = now or timezone.now()
    lead = timedelta(days=current_policy().key_management.rotation_lead_days)
    keys = SigningKey.objects.filter(
        authority__in=list(authorities), state=KeyState.ACTIVE, not_after__lte=now + lead
    ).order_by("authority")
    return [
        Notice(key, key.not_after is not None and key.not_after <= now,
               _open_create_ceremony(key.authority, now))
        for key in keys
    ]  # fmt: skip


def _name(key: SigningKey) -> str:
    return f"{key.authority} key {key.fingerprint}"


def _day(when: datetime | None) -> str:
    return f"{when:%Y-%m-%d %H:%M} UTC" if when is not None else "never"
