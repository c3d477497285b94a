"""Recording and activating keys. Every state change is audited in its own transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
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
        if activate:
            plan_resigning_on_commit(authority)
    return key


def plan_resigning_on_commit(authority: str) -> None:
    """Once a new active key is committed, plan re-signing the older keys' signatures and
    hand the requests that waited for a key to the worker.

    After the commit, so the planner sees the key; robust, so a planning error never undoes
    or hides the activation (the worker's sweep plans again). Planning needs no broker.
    """

    def plan() -> None:
        from keys.resigning import plan_for_authority  # re-signing builds on the lifecycle

        plan_for_authority(authority)
        # Requests that waited for a key are signed now, not at the next reconcile: by the
        # worker, or here (inline mode: development, or a manage.py shell next to the stack).
        if settings.SIGNING_MODE == "worker":
            from worker.tasks.signing import enqueue_waiting

            enqueue_waiting(authority)
        else:
            from signing_service.signing import sign_waiting

            sign_waiting(authority)

    transaction.on_commit(plan, robust=True)


def _jsonable(attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        str(k): v if isinstance(v, bool | int | str) or v is None else str(v)
        for k, v in attributes.items()
    }


#: The key state machine of SPEC section 5; every state change goes through transition().
ALLOWED: dict[str, frozenset[str]] = {
    KeyState.PENDING: frozenset({KeyState.ACTIVE, KeyState.RETIRED}),
    KeyState.ACTIVE: frozenset({KeyState.TRANSITION, KeyState.REVOKED}),
    KeyState.TRANSITION: frozenset({KeyState.RETIRED, KeyState.REVOKED}),
    KeyState.RETIRED: frozenset({KeyState.REVOKED}),
    KeyState.REVOKED: frozenset(),
}


class KeyStateError(ValueError):
    """A state change the key state machine does not allow."""


def transition(
    key_id: int,
    to: str,
    *,
    actor: str,
    reason: str = "",
    effective_at: Any = None,
    backend: KeyBackend | None = None,
) -> SigningKey:
    """Move a key to ``to`` if the state machine allows it; audit it in the same transaction.

    Activating needs ``backend`` so the key's attributes are re-checked on the HSM or Vault
    first; revoking records ``effective_at`` (default now): signatures made at or after it
    are no longer accepted.
    """
    with transaction.atomic():
        # Locked so two custodians acting at once cannot both move the same key.
        key = SigningKey.objects.select_for_update().get(pk=key_id)
        if to not in ALLOWED[key.state]:
            raise KeyStateError(f"a {key.state} key cannot become {to}")
        now = timezone.now()
        data: dict[str, Any] = {"from": key.state, "to": to, "reason": reason}
        if to == KeyState.ACTIVE:
            if backend is None:
                raise KeyStateError("activating a key needs its backend to re-check it")
            key.attributes = _jsonable(backend.check_usable(key.key_ref))
            key.activated_at, key.not_before = now, now
            data["attributes_checked"] = key.attributes
        if to == KeyState.TRANSITION:
            key.transitioned_at = now
        if to == KeyState.REVOKED:
            key.revoked_at = now
            key.revocation_effective_at = effective_at or now
            key.revocation_reason = reason
            data["effective_at"] = key.revocation_effective_at.isoformat()
        key.state = to
        key.save()
        audit.record(
            actor,
            f"key.{to}",
            target=key,
            data={"authority": key.authority, "hint": key.hint, **data},
        )
        if to == KeyState.ACTIVE:
            plan_resigning_on_commit(key.authority)
    return key
