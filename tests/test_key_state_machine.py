"""The key state machine: only the allowed moves, one active key per authority, audited."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from keys.lifecycle import KeyStateError, transition
from keys.models import KeyState, SigningKey
from signing_service.models import AuditEntry

pytestmark = pytest.mark.django_db


def make_key(state: str = KeyState.PENDING, authority: str = "staging", n: int = 0) -> SigningKey:
    return SigningKey.objects.create(
        authority=authority, backend="pkcs11", key_ref={"token": "t", "id": str(n)},
        public_key_pem="-----BEGIN PUBLIC KEY-----\n", hint=f"{n:064x}", state=state,
    )  # fmt: skip


class FakeBackend:
    """Stands in for the HSM only to answer check_usable; signing is never exercised here."""

    def __init__(self, usable: bool = True) -> None:
        self.usable = usable

    def check_usable(self, key_ref: Any) -> dict[str, Any]:
        from keys.backends.base import KeyNotUsable

        if not self.usable:
            raise KeyNotUsable("EXTRACTABLE is true")
        return {"sensitive": True}


def test_the_lifecycle_moves_forward() -> None:
    key = make_key()
    for state in (KeyState.ACTIVE, KeyState.TRANSITION, KeyState.RETIRED, KeyState.REVOKED):
        key = transition(key.pk, state, actor="custodian", backend=FakeBackend())
        assert key.state == state
    actions = list(AuditEntry.objects.values_list("action", flat=True))
    assert actions == ["key.active", "key.transition", "key.retired", "key.revoked"]


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (KeyState.PENDING, KeyState.TRANSITION),
        (KeyState.ACTIVE, KeyState.PENDING),
        (KeyState.TRANSITION, KeyState.ACTIVE),
        (KeyState.RETIRED, KeyState.ACTIVE),
        (KeyState.REVOKED, KeyState.ACTIVE),
        (KeyState.REVOKED, KeyState.RETIRED),
    ],
)
def test_disallowed_moves_are_refused(start: str, to: str) -> None:
    key = make_key(state=start)
    with pytest.raises(KeyStateError, match=f"a {start} key cannot become {to}"):
        transition(key.pk, to, actor="custodian", backend=FakeBackend())
    assert SigningKey.objects.get(pk=key.pk).state == start


def test_an_unusable_key_is_never_activated() -> None:
    from keys.backends.base import KeyNotUsable

    key = make_key()
    with pytest.raises(KeyNotUsable, match="EXTRACTABLE"):
        transition(key.pk, KeyState.ACTIVE, actor="custodian", backend=FakeBackend(usable=False))
    assert SigningKey.objects.get(pk=key.pk).state == KeyState.PENDING


def test_exactly_one_active_key_per_authority() -> None:
    make_key(state=KeyState.ACTIVE, n=1)
    second = make_key(n=2)
    with pytest.raises(IntegrityError), transaction.atomic():
        transition(second.pk, KeyState.ACTIVE, actor="custodian", backend=FakeBackend())
    make_key(state=KeyState.ACTIVE, authority="production", n=3)  # other authorities are fine


def test_revocation_records_its_effective_time() -> None:
    key = make_key(state=KeyState.ACTIVE)
    when = timezone.now() - timedelta(days=3)
    key = transition(
        key.pk, KeyState.REVOKED, actor="responder", reason="compromised", effective_at=when
    )
    assert key.revocation_effective_at == when
    assert key.revocation_reason == "compromised"
    assert not key.can_sign()


@pytest.mark.parametrize(
    "state", [KeyState.PENDING, KeyState.TRANSITION, KeyState.RETIRED, KeyState.REVOKED]
)
def test_only_an_active_key_in_its_window_signs(state: str) -> None:
    assert not make_key(state=state).can_sign()
    active = make_key(state=KeyState.ACTIVE, authority="production", n=9)
    assert active.can_sign()
    active.not_after = timezone.now() - timedelta(seconds=1)
    assert not active.can_sign()


@pytest.mark.softhsm
@pytest.mark.parametrize("state", [KeyState.TRANSITION, KeyState.REVOKED])
def test_a_request_never_falls_back_to_another_key(
    api: Any, issue_token: Any, active_keys: Any, state: str
) -> None:
    from signing_service.models import Signature
    from tests.fixtures_service import authed, request_body

    transition(active_keys["staging"].pk, state, actor="custodian")
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json"
    )
    assert response.status_code == 201
    body = response.json()
    # It waits (SPEC section 9: in-flight requests wait for a new active key); it is not
    # signed by any other key meanwhile.
    assert body["state"] == "approved"
    assert "no active signing key for authority 'staging'" in body["waiting_reason"]
    assert not Signature.objects.exists()  # production's and development's keys were not used


@pytest.mark.softhsm
def test_an_extractable_hsm_key_is_never_activated(hsm: Any, softhsm_token: Any) -> None:
    """A key made on the token outside the service (extractable) is refused at activation."""
    from keys import registry
    from keys.backends.base import GeneratedKey, KeyNotUsable
    from keys.lifecycle import register_key
    from tests.test_pkcs11_backend import raw_keypair, raw_session

    backend = registry.pkcs11_backend("staging")
    with raw_session(softhsm_token) as session:
        key_ref, _ = raw_keypair(session, softhsm_token, extractable=True)
    # The backend will not even read such a key's public half; any public key does here,
    # since what is under test is that activation re-checks the private key on the token.
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(KeyNotUsable, match="EXTRACTABLE is true"):
        register_key(
            "staging", backend, GeneratedKey(key_ref, public), algorithm="ECDSA-P256",
            validity=timedelta(days=1), actor="tests", activate=True,
        )  # fmt: skip
    assert not SigningKey.objects.exists()
    pending = register_key(
        "staging", backend, GeneratedKey(key_ref, public), algorithm="ECDSA-P256",
        validity=timedelta(days=1), actor="tests", activate=False,
    )  # fmt: skip
    with pytest.raises(KeyNotUsable, match="NEVER_EXTRACTABLE is false"):
        transition(pending.pk, KeyState.ACTIVE, actor="custodian", backend=backend)
    assert SigningKey.objects.get(pk=pending.pk).state == KeyState.PENDING
