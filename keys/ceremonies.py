"""Key ceremonies (SPEC section 9): creating or destroying a key takes a quorum of custodians.

Rules, all enforced here for the web pages and ``manage.py key_ceremony`` alike:

* only custodians of the authority (group ``custodians:<authority>``) open or confirm;
* each confirmation needs a second factor verified within APPROVAL_OTP_MAX_AGE_SECONDS;
  the opener's own confirmation counts as the first;
* ``ceremony_quorum`` distinct custodians; the same person twice counts once (refused);
* a ceremony must complete within CEREMONY_TTL_MINUTES, or it expires;
* the rotation job (:mod:`keys.rotation`) opens a create ceremony itself when the active key
  nears its ``not_after`` (:func:`open_rotation_ceremony`): it has no opener, so all
  ``ceremony_quorum`` confirmations come from custodians, and it expires with the key it
  replaces rather than after CEREMONY_TTL_MINUTES;
* the key is generated only when the quorum completes, inside the transaction that records
  it, so an aborted, expired or killed ceremony leaves no key the service would use; on Vault
  it is a new version of the authority's transit key (``VAULT_KEY_<AUTHORITY>``), created,
  adopted by rotating it, or rotated (:func:`_new_vault_key`), with the ceremonies' own Vault
  credential when one is set; a backend refusal at the quorum records nothing;
* the new key becomes active; the authority's previous active key enters ``transition``;
* only a retired or revoked key can be destroyed; destroying deletes the private key in the
  backend (PKCS#11 C_DestroyObject) and keeps its public record for verifiers and audits.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from approvals.groups import custodian_group, identity_of
from approvals.services import check_fresh_otp
from keys.backends.base import GeneratedKey, KeyBackendError, KeyNotUsable
from keys.lifecycle import register_key, transition
from keys.models import (
    CeremonyConfirmation,
    CeremonyPurpose,
    CeremonyState,
    KeyBackendName,
    KeyCeremony,
    KeyState,
    SigningKey,
)
from keys.registry import backend_for, backend_for_authority, vault_key_name, vault_key_variable
from signing_service import audit
from signing_service.policy import current_policy
from signing_service.signing import SigningRefused

#: The actor the audit log names for what the rotation job does.
SYSTEM_ACTOR = "rotation-job"
KEY_BACKENDS = (KeyBackendName.PKCS11, KeyBackendName.VAULT)


def is_custodian(user: Any, authority: str) -> bool:
    return bool(
        getattr(user, "is_active", False)
        and user.groups.filter(name=custodian_group(authority)).exists()
    )


def custodian_authorities(user: Any) -> list[str]:
    if not getattr(user, "is_authenticated", False):
        return []
    prefix = custodian_group("")
    names = user.groups.filter(name__startswith=prefix).values_list("name", flat=True)
    return sorted(n[len(prefix) :] for n in names)


def open_ceremony(
    authority: str,
    user: Any,
    *,
    otp_verified_at: datetime | None,
    note: str = "",
    purpose: str = CeremonyPurpose.CREATE,
    key: SigningKey | None = None,
) -> KeyCeremony:
    """Open a ceremony to create a key, or to destroy ``key`` (retired or revoked only)."""
    policy = current_policy()
    auth = policy.authority(authority)
    if auth is None or auth.backend not in ("pkcs11", "vault"):
        raise SigningRefused("invalid", f"{authority!r} is not a key-based authority in the policy")
    if not is_custodian(user, authority):
        raise SigningRefused(
            "not_custodian", f"you are not a key custodian for {authority!r}", status=403
        )
    _check_purpose(authority, purpose, key)
    verified = check_fresh_otp(otp_verified_at)
    now = timezone.now()
    try:
        with transaction.atomic():
            ceremony = KeyCeremony.objects.create(
                authority=authority, purpose=purpose, quorum=policy.key_management.ceremony_quorum,
                algorithm=key.algorithm if key else auth.key_algorithm,
                backend=key.backend if key else auth.backend, key=key, opened_by=user, opened_at=now,
                expires_at=now + timedelta(minutes=settings.CEREMONY_TTL_MINUTES), note=note[:500],
            )  # fmt: skip
            _confirm_row(ceremony, user, verified)
            audit.record(
                identity_of(user), "ceremony.opened", target=ceremony, data=_summary(ceremony)
            )
    except IntegrityError:
        raise SigningRefused(
            "ceremony_open", f"a key ceremony for {authority!r} is already open", status=409
        ) from None
    return ceremony


def open_rotation_ceremony(key: SigningKey, *, now: datetime | None = None) -> KeyCeremony | None:
    """Open the system's ceremony to replace ``key``, the active key nearing its ``not_after``.

    Nobody confirms by opening it: ``ceremony_quorum`` custodians must each confirm with a
    fresh second factor. It stays open until ``key.not_after``. Returns None when a create
    ceremony for the authority is already open (custodians confirm that one instead).
    """
    policy = current_policy()
    auth = policy.authority(key.authority)
    if auth is None or auth.backend not in KEY_BACKENDS:
        raise SigningRefused(
            "invalid", f"{key.authority!r} is not a key-based authority in the policy"
        )
    now = now or timezone.now()
    if key.state != KeyState.ACTIVE or key.not_after is None or key.not_after <= now:
        raise SigningRefused(
            "invalid", f"only an active key that has not expired is rotated; {key} is not"
        )
    try:
        with transaction.atomic():  # a savepoint: the open-ceremony constraint settles races
            ceremony = KeyCeremony.objects.create(
                authority=key.authority, purpose=CeremonyPurpose.CREATE,
                quorum=policy.key_management.ceremony_quorum, algorithm=auth.key_algorithm,
                backend=auth.backend, opened_by=None, replaces=key, opened_at=now,
                expires_at=key.not_after,
                note=f"rotation: key {key.fingerprint} expires {key.not_after:%Y-%m-%d %H:%M} UTC",
            )  # fmt: skip
            audit.record(
                SYSTEM_ACTOR, "ceremony.opened", target=ceremony,
                data=_summary(ceremony) | {"replaces": key.hint, "expires_at": key.not_after.isoformat()},
            )  # fmt: skip
    except IntegrityError:
        return None
    return ceremony


def _check_purpose(authority: str, purpose: str, key: SigningKey | None) -> None:
    if purpose == CeremonyPurpose.CREATE:
        if key is not None:
            raise SigningRefused("invalid", "a create ceremony does not name a key")
        return
    if purpose != CeremonyPurpose.DESTROY:
        raise SigningRefused("invalid", f"unknown ceremony purpose {purpose!r}")
    if key is None or key.authority != authority:
        raise SigningRefused("invalid", f"name a key of {authority!r} to destroy")
    if key.state not in (KeyState.RETIRED, KeyState.REVOKED) or key.destroyed_at is not None:
        raise SigningRefused(
            "invalid", f"only a retired or revoked key can be destroyed; this one is {key.state}"
            + (" and already destroyed" if key.destroyed_at else "")
        )  # fmt: skip


def confirm(ceremony_id: Any, user: Any, *, otp_verified_at: datetime | None) -> KeyCeremony:
    """Add one custodian's confirmation; generate and activate the key at the quorum."""
    verified = check_fresh_otp(otp_verified_at)
    try:
        with transaction.atomic():
            # Locked: two custodians confirming together must not generate two keys.
            ceremony = KeyCeremony.objects.select_for_update().get(pk=ceremony_id)
            _check_open(ceremony, user)
            if ceremony.confirmations.filter(custodian=user).exists():
                raise SigningRefused(
                    "already_confirmed", "you have already confirmed this ceremony", status=409
                )
            _confirm_row(ceremony, user, verified)
            audit.record(
                identity_of(user), "ceremony.confirmed", target=ceremony, data=_summary(ceremony)
            )
            if ceremony.confirmations.count() >= ceremony.quorum:
                try:
                    if ceremony.purpose == CeremonyPurpose.DESTROY:
                        _complete_destroy(ceremony, user)
                    else:
                        _complete(ceremony, user)
                except KeyBackendError as exc:
                    # Rolls back this confirmation too: nothing is recorded, the ceremony
                    # stays open, and the custodian can confirm again once it is fixed.
                    raise SigningRefused(
                        "key_backend",
                        f"the quorum was reached but the key backend refused: {exc}. Nothing "
                        "was recorded and the ceremony stays open; confirm again once fixed",
                        status=503,
                    ) from exc
    except SigningRefused as exc:
        if exc.code == "ceremony_expired":
            _close(ceremony_id, CeremonyState.EXPIRED, "signing-service")
        raise
    return KeyCeremony.objects.get(pk=ceremony_id)


def abort(ceremony_id: Any, user: Any, reason: str = "") -> KeyCeremony:
    ceremony = KeyCeremony.objects.get(pk=ceremony_id)
    if not is_custodian(user, ceremony.authority):
        raise SigningRefused(
            "not_custodian", "only a custodian may abort this ceremony", status=403
        )
    if not _close(ceremony_id, CeremonyState.ABORTED, identity_of(user), reason):
        raise SigningRefused("ceremony_closed", f"the ceremony is {ceremony.state}", status=409)
    return KeyCeremony.objects.get(pk=ceremony_id)


def _check_open(ceremony: KeyCeremony, user: Any) -> None:
    if not is_custodian(user, ceremony.authority):
        raise SigningRefused(
            "not_custodian", f"you are not a key custodian for {ceremony.authority!r}", status=403
        )
    if ceremony.state != CeremonyState.OPEN:
        raise SigningRefused("ceremony_closed", f"the ceremony is {ceremony.state}", status=409)
    if ceremony.expires_at <= timezone.now():
        raise SigningRefused(
            "ceremony_expired", "the ceremony expired before its quorum was reached", status=409
        )


def _confirm_row(ceremony: KeyCeremony, user: Any, verified: datetime) -> None:
    CeremonyConfirmation.objects.create(
        ceremony=ceremony,
        custodian=user,
        custodian_identity=identity_of(user),
        otp_verified_at=verified,
    )


def _complete(ceremony: KeyCeremony, user: Any) -> None:
    authority = current_policy().authority(ceremony.authority)
    assert authority is not None
    backend = backend_for_authority(ceremony.authority, ceremony.backend)
    # Random suffix: a ceremony killed after generating leaves an unrecorded key on the
    # backend (never used: the service only signs with keys it recorded); a retry must not
    # collide with its label.
    label = f"{ceremony.authority}-{timezone.now():%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
    previous = (
        SigningKey.objects.select_for_update()
        .filter(authority=ceremony.authority, state=KeyState.ACTIVE)
        .first()
    )
    generated, made = _new_key(backend, ceremony, label)
    if previous is not None:
        transition(
            previous.pk,
            KeyState.TRANSITION,
            actor=identity_of(user),
            reason=f"replaced by ceremony {ceremony.pk}",
        )
    witnesses = list(
        ceremony.confirmations.values("custodian_identity", "confirmed_at", "otp_verified_at")
    )
    key = register_key(
        ceremony.authority, backend, generated, algorithm=ceremony.algorithm, validity=authority.key_rotation,
        actor=identity_of(user), activate=True,
        transcript={"ceremony": str(ceremony.pk), "quorum": ceremony.quorum, "custodians": witnesses,
                    "replaces": previous.hint if previous else None, **made},
    )  # fmt: skip
    ceremony.state, ceremony.key, ceremony.closed_at = CeremonyState.COMPLETED, key, timezone.now()
    ceremony.save(update_fields=["state", "key", "closed_at"])
    audit.record(
        identity_of(user),
        "ceremony.completed",
        target=ceremony,
        data=_summary(ceremony) | {"key": key.hint},
    )


def _new_key(
    backend: Any, ceremony: KeyCeremony, label: str
) -> tuple[GeneratedKey, dict[str, Any]]:
    """A new HSM key; in Vault, a new version of the authority's transit key.

    Returns the key and what the audit transcript says about how it was made.
    """
    if ceremony.backend != KeyBackendName.VAULT:
        return backend.generate(label, ceremony.algorithm), {}
    return _new_vault_key(backend, ceremony)


def _new_vault_key(backend: Any, ceremony: KeyCeremony) -> tuple[GeneratedKey, dict[str, Any]]:
    """The version of ``VAULT_KEY_<AUTHORITY>`` this ceremony pins, made at the quorum.

    Created if the transit key does not exist; adopted by rotating it if nothing pins it yet
    (an administrator made it with deploy/vault/setup.py); rotated if earlier keys pinned it.
    Rotating raises min_encryption_version, so older versions stop signing in Vault too, while
    their signatures keep verifying with their recorded public keys.
    """
    name = vault_key_name(ceremony.authority)
    pins = SigningKey.objects.filter(
        backend=KeyBackendName.VAULT, key_ref__name=name, key_ref__mount=backend.mount
    )
    others = sorted(
        set(pins.exclude(authority=ceremony.authority).values_list("authority", flat=True))
    )
    if others:
        raise KeyNotUsable(
            f"transit key {name!r} (mount {backend.mount!r}) is pinned by keys of "
            f"{', '.join(map(repr, others))}: give each authority its own transit key "
            f"({vault_key_variable(ceremony.authority)})"
        )
    generated, facts = backend.ceremony_key(name, ceremony.algorithm, pinned=pins.exists())
    return generated, {"vault": facts}


def _complete_destroy(ceremony: KeyCeremony, user: Any) -> None:
    key = SigningKey.objects.select_for_update().get(pk=ceremony.key_id)
    _check_purpose(ceremony.authority, ceremony.purpose, key)
    destroyed = backend_for(key).destroy(key.key_ref)
    key.destroyed_at = timezone.now()
    key.save(update_fields=["destroyed_at"])
    ceremony.state, ceremony.closed_at = CeremonyState.COMPLETED, timezone.now()
    ceremony.save(update_fields=["state", "closed_at"])
    witnesses = list(
        ceremony.confirmations.values("custodian_identity", "confirmed_at", "otp_verified_at")
    )
    audit.record(
        identity_of(user), "key.destroyed", target=key,
        data={"ceremony": str(ceremony.pk), "hint": key.hint, "destroyed": destroyed, "custodians": witnesses},
    )  # fmt: skip
    audit.record(
        identity_of(user),
        "ceremony.completed",
        target=ceremony,
        data=_summary(ceremony) | {"key": key.hint},
    )


def expire_overdue(ceremony_id: Any, *, now: datetime | None = None) -> bool:
    """Mark an open ceremony past its ``expires_at`` as expired (the rotation job's sweep).

    Confirming marks one too; sweeping also frees the authority for a new ceremony.
    """
    now = now or timezone.now()
    with transaction.atomic():
        # Conditional: a ceremony that completed or was aborted meanwhile keeps its state.
        moved = KeyCeremony.objects.filter(
            pk=ceremony_id, state=CeremonyState.OPEN, expires_at__lte=now
        ).update(state=CeremonyState.EXPIRED, closed_at=now)
        if moved:
            ceremony = KeyCeremony.objects.get(pk=ceremony_id)
            audit.record(
                SYSTEM_ACTOR, f"ceremony.{CeremonyState.EXPIRED}", target=ceremony,
                data=_summary(ceremony) | {"reason": "its quorum was not reached in time"},
            )  # fmt: skip
    return bool(moved)


def _close(ceremony_id: Any, state: str, actor: str, reason: str = "") -> bool:
    with transaction.atomic():
        moved = KeyCeremony.objects.filter(pk=ceremony_id, state=CeremonyState.OPEN).update(
            state=state, closed_at=timezone.now()
        )
        if moved:
            ceremony = KeyCeremony.objects.get(pk=ceremony_id)
            audit.record(actor, f"ceremony.{state}", target=ceremony, data={"reason": reason})
    return bool(moved)


def _summary(ceremony: KeyCeremony) -> dict[str, Any]:
    return {
        "authority": ceremony.authority,
        "purpose": ceremony.purpose,
        "quorum": ceremony.quorum,
        "confirmations": ceremony.confirmations.count(),
        "backend": ceremony.backend,
    }
