"""A key that stops being active between the HSM call and the store signs nothing published.

The HSM call holds no database lock, so a custodian can revoke the key (or a rotation can
retire it) while a request is being signed. The store then finds the key no longer active,
stores nothing, and signs again with the key active then, or leaves the request waiting for
one: never a valid signature of a revoked key that its revocation did not quarantine.
Both signing paths: at submission (the API, inline) and a claimed request (the worker).
On PostgreSQL a store under way makes the revocation wait, then it is quarantined.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from keys.lifecycle import transition
from keys.models import KeyState, SigningKey
from keys.revocation import revoke
from signing_service import audit, bundle, signing
from signing_service.models import AuditEntry, RequestState, Signature, SigningRequest
from tests.fixtures_service import authed, request_body
from tests.test_postgres_locking import Waiting
from tests.test_signing_faults import new_staging_key
from tests.test_worker_tasks import approved_request

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]
URL = "/api/v1/signing-requests/"


def after_the_hsm_signs(monkeypatch: pytest.MonkeyPatch, change: Callable[[], Any]) -> list[int]:
    """Run ``change`` once, right after the first signature is made and checked (before it
    is stored); returns the list that counts every signature made."""
    made: list[int] = []
    real = signing._check_signature

    def check_then_change(key: SigningKey, payload: bytes, der: bytes) -> None:
        real(key, payload, der)
        made.append(key.pk)
        if len(made) == 1:
            change()

    monkeypatch.setattr(signing, "_check_signature", check_then_change)
    return made


def revoke_now(key: SigningKey, effective_at: datetime | None = None) -> Callable[[], Any]:
    return lambda: revoke(key.pk, reason="compromised", effective_at=effective_at, actor="ir")


def rotate(key: SigningKey) -> Callable[[], SigningKey]:
    """The old key to ``transition``, a new one active (what a rotation's activation does)."""

    def run() -> SigningKey:
        transition(key.pk, KeyState.TRANSITION, actor="tests", reason="rotated")
        return new_staging_key()

    return run


def submit(issue_token: Any) -> dict[str, Any]:
    response = authed(APIClient(), issue_token()).post(URL, request_body(), format="json")
    assert response.status_code == 201, response.content
    return dict(response.json())


def test_a_key_revoked_while_a_submission_was_signed_stores_no_signature(
    active_keys: Any, issue_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = active_keys["staging"]
    made = after_the_hsm_signs(monkeypatch, revoke_now(key))
    body = submit(issue_token)
    assert made == [key.pk]  # signed once; the second try found no active key
    assert body["state"] == RequestState.APPROVED
    assert "no active signing key" in body["waiting_reason"]
    assert not Signature.objects.exists()
    # The request and its audit record are stored (it is signed once a new key is active).
    created = AuditEntry.objects.get(action="signing_request.created")
    assert created.target_id == body["id"]
    assert created.data["state"] == RequestState.APPROVED
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)


def test_a_key_rotated_while_a_submission_was_signed_is_signed_again_with_the_new_key(
    active_keys: Any, issue_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = active_keys["staging"]
    rotated: list[SigningKey] = []
    made = after_the_hsm_signs(monkeypatch, lambda: rotated.append(rotate(old)()))
    body = submit(issue_token)
    new = rotated[0]
    assert made == [old.pk, new.pk]
    assert body["state"] == RequestState.SIGNED
    assert body["key"]["id"] == new.pk
    sig = Signature.objects.get(request_id=body["id"])
    assert (sig.key_id, sig.state) == (new.pk, "valid")
    assert bundle.verify_bundle(sig.bundle, bundle.load_public_key(new.public_key_pem))
    assert AuditEntry.objects.filter(action="signature.issued").count() == 1
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)


def test_a_key_revoked_while_a_claimed_request_was_signed_leaves_it_waiting(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = active_keys["staging"]
    req = approved_request()
    made = after_the_hsm_signs(monkeypatch, revoke_now(key))
    done = signing.sign(req.pk)
    assert made == [key.pk]
    assert done.state == RequestState.APPROVED
    assert "no active signing key" in done.waiting_reason
    assert not Signature.objects.exists()
    assert not AuditEntry.objects.filter(action="signature.issued").exists()
    # A new key signs it, as any request waiting for a key.
    new = new_staging_key()
    assert signing.sign(req.pk).state == RequestState.SIGNED
    assert Signature.objects.get(request=req).key_id == new.pk


def test_a_key_rotated_while_a_claimed_request_was_signed_is_signed_with_the_new_key(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = active_keys["staging"]
    req = approved_request()
    rotated: list[SigningKey] = []
    made = after_the_hsm_signs(monkeypatch, lambda: rotated.append(rotate(old)()))
    assert signing.sign(req.pk).state == RequestState.SIGNED
    assert made == [old.pk, rotated[0].pk]
    assert Signature.objects.get(request=req).key_id == rotated[0].pk


@pytest.mark.parametrize("path", ["submission", "claimed"])
def test_keys_that_keep_changing_leave_the_request_waiting_after_two_tries(
    path: str, active_keys: Any, issue_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SigningKey.objects, "lock_if_active", lambda key_id: False)
    made = after_the_hsm_signs(monkeypatch, lambda: None)
    if path == "submission":
        body = submit(issue_token)
        state, reason = body["state"], body["waiting_reason"]
    else:
        done = signing.sign(approved_request().pk)
        state, reason = done.state, done.waiting_reason
    assert len(made) == signing._SIGN_ATTEMPTS == 2
    assert state == RequestState.APPROVED
    assert "stopped being active (revoked or rotated) while the request was signed" in reason
    assert not Signature.objects.exists()
    assert SigningRequest.objects.get().state == RequestState.APPROVED


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a lock wait between two connections")
def test_a_revocation_waits_for_a_store_under_way_and_quarantines_it(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = active_keys["staging"]
    req = approved_request()
    compromised_since = timezone.now() - timedelta(minutes=5)  # before the signature
    revoking: list[Waiting[Any]] = []
    real_record = audit.record

    def record_then_revoke(*args: Any, **kwargs: Any) -> Any:
        entry = real_record(*args, **kwargs)
        if args[1] == "signature.issued":  # inside the store's transaction, still open
            assert transaction.get_connection().in_atomic_block
            revoking.append(Waiting(revoke_now(key, compromised_since)))  # waits for us
        return entry

    monkeypatch.setattr(signing.audit, "record", record_then_revoke)
    assert signing.sign(req.pk).state == RequestState.SIGNED
    incident = revoking[0].result()
    assert incident.quarantined == 1
    assert Signature.objects.get(request=req).state == "quarantined"
