"""The signed trust document (``GET /api/v1/trust/``): every non-pending key, for offline
verifiers. The client half is :mod:`signing_service.client.trust`.

How ``version`` is derived: the document without ``version`` and ``issued_at`` (keys,
their states and windows, the authorities, the verification policy and the policy file's
digest) is hashed. If the hash equals the newest stored :class:`TrustDocument`'s, that row
is served as stored; otherwise the new content is signed and stored as version
``newest + 1``. So the version stays put while nothing changes, and increases on every
change, including a change back to an earlier content. The unique ``version`` column
serialises replicas that notice the same change at once: the loser re-reads.

Signing: one DSSE signature per active key (``keyid`` = its hint), made by its backend
once per version. A backend that fails is skipped, and its signature is added to the same
version later (at most every ``TRUST_RESIGN_SECONDS``); a document that no key could sign
is never stored or served (:class:`TrustUnavailable`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from keys.backends.base import KeyBackendError
from keys.models import KeyState, SigningKey
from keys.registry import backend_for
from signing_service import bundle
from signing_service.client.trust import TRUST_PAYLOAD_TYPE, TRUST_TYPE, format_time
from signing_service.models import AuditEntry, TrustDocument
from signing_service.policy import RESERVED_AUTHORITIES, Policy, current_policy

log = logging.getLogger(__name__)

DEFAULT_RESIGN_SECONDS = 60
_ISSUE_ATTEMPTS = 3


class TrustUnavailable(Exception):
    """No key could sign the current trust document; the message says why."""


# --- content ---------------------------------------------------------------------------


def document_content(policy: Policy | None = None) -> dict[str, Any]:
    """The document without ``version`` and ``issued_at``: a pure function of the database
    and the policy, so equal content means an unchanged trust state."""
    policy = policy or current_policy()
    # The audit checkpoint key is not a model-signing key: verifiers must never accept it.
    keys = list(
        SigningKey.objects.exclude(state=KeyState.PENDING)
        .exclude(authority__in=RESERVED_AUTHORITIES)
        .order_by("authority", "created_at", "hint")
    )
    starts = _transition_starts(keys)
    window = timedelta(days=policy.key_management.transition_days)
    return {
        "type": TRUST_TYPE,
        "policy_digest": policy.digest,
        "keys": [_key_entry(k, starts.get(k.pk), window) for k in keys],
        "authorities": {
            name: {"requires_approval": a.requires_approval, "approval_count": a.approval_count}
            for name, a in sorted(policy.authorities.items())
        },
        "verification_policy": {
            name: {
                "require_signature": r.require_signature,
                "accepted_authorities": list(r.accepted_authorities),
                "require_provenance": r.require_provenance,
                "max_signature_age_days": r.max_signature_age_days,
            }
            for name, r in sorted(policy.verification.items())
        },
    }


def _key_entry(key: SigningKey, entered: datetime | None, window: timedelta) -> dict[str, Any]:
    # Null when unknown (no audit record): verifiers then refuse the key, failing closed.
    until = entered + window if key.state == KeyState.TRANSITION and entered else None
    return {
        "authority": key.authority,
        "hint": key.hint,
        "algorithm": key.algorithm,
        "public_key_pem": key.public_key_pem,
        "state": key.state,
        "not_before": format_time(key.not_before),
        "not_after": format_time(key.not_after),
        "transition_until": format_time(until),
        "revoked_at": format_time(key.revoked_at),
        "revocation_effective_at": format_time(key.revocation_effective_at),
        "revocation_reason": key.revocation_reason or None,
    }


def _transition_starts(keys: Iterable[SigningKey]) -> dict[int, datetime]:
    """When each transition key entered transition. SigningKey has no column for it; the
    hash-chained audit log records every state change with its time, so it is the source."""
    ids = [str(k.pk) for k in keys if k.state == KeyState.TRANSITION]
    if not ids:
        return {}
    entries = AuditEntry.objects.filter(
        action=f"key.{KeyState.TRANSITION}", target_type="SigningKey", target_id__in=ids
    ).values_list("target_id", "created_at")
    return {int(target): at for target, at in entries}  # ordered by seq: the latest wins


def _canonical(value: Any) -> bytes:
    return bundle.statement_payload(value)  # sorted keys, no spaces: stable bytes


def content_digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(content)).hexdigest()


# --- serving ---------------------------------------------------------------------------


def current_document() -> TrustDocument:
    """The stored, signed document for the current content; sign a new version if needed."""
    for _ in range(_ISSUE_ATTEMPTS):
        # Read the newest row before the keys: a row written after our read of the keys
        # then always wins the version race against our (possibly older) content.
        newest = TrustDocument.objects.order_by("-version").first()
        content = document_content()
        digest = content_digest(content)
        if newest is not None and newest.content_digest == digest:
            return _complete_signatures(newest)
        try:
            return _issue(content, digest, (newest.version if newest else 0) + 1)
        except IntegrityError:
            continue  # another replica stored this version first: look again
    raise TrustUnavailable("the trust document kept changing while it was being issued")


def _issue(content: dict[str, Any], digest: str, version: int) -> TrustDocument:
    now = timezone.now()
    document = {**content, "version": version, "issued_at": format_time(now)}
    payload = _canonical(document)
    keys = _active_now(now)
    if not keys:
        raise TrustUnavailable("there is no active signing key to sign the trust document")
    signatures = _sign(payload, keys)
    with transaction.atomic():
        return TrustDocument.objects.create(
            version=version,
            content_digest=digest,
            issued_at=now,
            envelope=_envelope(payload, signatures),
            signed_by=[s["keyid"] for s in signatures],
            signatures_checked_at=now,
        )


def _active_now(now: datetime) -> list[SigningKey]:
    """The keys that sign: active, and inside their validity window (as for bundles); never
    the audit checkpoint key, which signs checkpoints only."""
    keys = (
        SigningKey.objects.filter(state=KeyState.ACTIVE)
        .exclude(authority__in=RESERVED_AUTHORITIES)
        .order_by("authority")
    )
    return [k for k in keys if k.can_sign(now)]


def _sign(payload: bytes, keys: list[SigningKey]) -> list[dict[str, str]]:
    """One signature per key whose backend works; TrustUnavailable if none does."""
    signatures, failures = _try_sign(payload, keys)
    if not signatures:
        raise TrustUnavailable(
            "no key backend could sign the trust document: " + "; ".join(failures)
        )
    return signatures


def _try_sign(payload: bytes, keys: list[SigningKey]) -> tuple[list[dict[str, str]], list[str]]:
    signed = bundle.pae(payload, TRUST_PAYLOAD_TYPE)
    signatures: list[dict[str, str]] = []
    failures: list[str] = []
    for key in keys:
        try:
            der = backend_for(key).sign(key.key_ref, signed)
            _check_signature(key, signed, der)
        except (KeyBackendError, InvalidSignature) as exc:
            # Serve what the working keys signed; never let one HSM take the document down.
            reason = str(exc) or "the signature does not verify with the key on record"
            log.warning(
                "trust document: %s key %s did not sign: %s", key.authority, key.hint, reason
            )
            failures.append(f"{key.authority} key {key.fingerprint}: {reason}")
            continue
        signatures.append({"keyid": key.hint, "sig": base64.b64encode(der).decode("ascii")})
    return signatures, failures


def _check_signature(key: SigningKey, signed: bytes, der: bytes) -> None:
    """Fail closed if the backend signed with a key other than the one on record."""
    public = bundle.load_public_key(key.public_key_pem)
    public.verify(der, signed, ec.ECDSA(bundle.curve_hash(public)))


def _envelope(payload: bytes, signatures: list[dict[str, str]]) -> str:
    envelope = {
        "payloadType": TRUST_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": signatures,
    }
    return json.dumps(envelope, indent=2) + "\n"


# --- signatures missing because a backend was down -------------------------------------


def _complete_signatures(doc: TrustDocument) -> TrustDocument:
    """Add signatures of active keys whose backend failed when ``doc`` was issued.

    Rate limited, and claimed with a conditional UPDATE, so a backend that stays down
    costs one attempt per interval across all replicas, not one per GET.
    """
    now = timezone.now()
    missing = [k for k in _active_now(now) if k.hint not in doc.signed_by]
    interval = timedelta(seconds=_resign_seconds())
    if not missing or now - doc.signatures_checked_at < interval:
        return doc
    claimed = TrustDocument.objects.filter(
        pk=doc.pk, signatures_checked_at=doc.signatures_checked_at
    ).update(signatures_checked_at=now)
    if not claimed:
        return TrustDocument.objects.get(pk=doc.pk)  # another process is at it
    payload = base64.b64decode(json.loads(doc.envelope)["payload"])
    added, _failures = _try_sign(payload, missing)
    if not added:
        return TrustDocument.objects.get(pk=doc.pk)
    return _add_signatures(doc.pk, payload, added)


def _add_signatures(pk: int, payload: bytes, added: list[dict[str, str]]) -> TrustDocument:
    with transaction.atomic():
        doc = TrustDocument.objects.select_for_update().get(pk=pk)
        current = json.loads(doc.envelope)["signatures"]
        fresh = [s for s in added if s["keyid"] not in doc.signed_by]
        doc.envelope = _envelope(payload, [*current, *fresh])
        doc.signed_by = [*doc.signed_by, *(s["keyid"] for s in fresh)]
        doc.save(update_fields=["envelope", "signed_by"])
    return doc


def _resign_seconds() -> int:
    return int(getattr(settings, "TRUST_RESIGN_SECONDS", DEFAULT_RESIGN_SECONDS))
