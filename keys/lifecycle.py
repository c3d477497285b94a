"""Recording and activating keys. Every state change is audited in its own transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from keys.backends.base import GeneratedKey, KeyBackend, KeyNotUsable
from keys.models import KeyState, SigningKey
from signing_service import audit, bundle


def register_key(
    authority: str,
    backend: KeyBackend,
    generated: GeneratedKey,
    *,
    algorithm: str,
    validity: timedelta,
    actor: str,
    activate: bool,
    transcript: dict[str, Any] | None = None,
) -> SigningKey:
    """Store a key generated on ``backend``; activate it only if the backend vouches for it.

    Activation re-reads the key's attributes from the backend (never trusting what the
    generator claimed), so a key that is extractable or was imported is never activated.
    """
    attributes = backend.check_usable(generated.key_ref) if activate else generated.attributes
    now = timezone.now()
    with transaction.atomic():
        if (
            activate
            and SigningKey.objects.filter(authority=authority, state=KeyState.ACTIVE).exists()
        ):
            raise KeyNotUsable(f"authority {authority!r} already has an active key")
        key = SigningKey.objects.create(
            authority=authority,
            backend=backend.name,
            key_ref=generated.key_ref,
            algorithm=algorithm,
            public_key_pem=bundle.public_key_pem(generated.public_key),
            hint=bundle.key_hint(generated.public_key),
            state=KeyState.ACTIVE if activate else KeyState.PENDING,
            not_before=now,
            not_after=now + validity,
            attributes=_jsonable(attributes),
            activated_at=now if activate else None,
        )
        audit.record(
            actor,
            "key.activated" if activate else "key.created",
            target=key,
            data={
                "authority": authority,
                "backend": backend.name,
                "key_ref": generated.key_ref,
                "hint": key.hint,
                "public_key_pem": key.public_key_pem,
                "attributes_checked": key.attributes,
                "not_after": key.not_after.isoformat() if key.not_after else None,
                **(transcript or {}),
            },
        )
    return key


def _jsonable(attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        str(k): v if isinstance(v, bool | int | str) or v is None else str(v)
        for k, v in attributes.items()
    }
