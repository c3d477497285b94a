"""Helpers for the re-signing tests: real keys on SoftHSM, real signatures made fast.

``bulk_signed`` stores signatures the way the service stores them (the same statement,
signed by the key on the HSM, in a real bundle) but inserts the rows in bulk, so a test can
have 10,000 of them in seconds. ``rotate`` and ``revoke_and_replace`` change keys through
the same functions a ceremony and the revocation runbook use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from keys import registry
from keys.lifecycle import register_key, transition
from keys.models import Incident, KeyState, SigningKey
from keys.revocation import revoke
from signing_service import bundle, signing
from signing_service.manifest import DEFAULT_IGNORE_PATHS, Resource
from signing_service.models import RequestState, Signature, SigningRequest
from signing_service.policy import current_policy
from tests.fixtures_service import CI_IDENTITY


def new_key(authority: str) -> SigningKey:
    """A new active key for ``authority`` on the HSM (the authority must have none active)."""
    backend = registry.pkcs11_backend(authority)
    generated = backend.generate(f"{authority}-{secrets.token_hex(4)}", "ECDSA-P256")
    return register_key(
        authority, backend, generated, algorithm="ECDSA-P256", validity=timedelta(days=365),
        actor="tests", activate=True,
    )  # fmt: skip


def rotate(old: SigningKey) -> SigningKey:
    """What a completed rotation ceremony does: the old key to transition, a new one active."""
    transition(old.pk, KeyState.TRANSITION, actor="tests", reason="rotation")
    return new_key(old.authority)


def revoke_and_replace(old: SigningKey, effective_at: datetime) -> tuple[Incident, SigningKey]:
    incident = revoke(old.pk, reason="compromised", effective_at=effective_at, actor="ir@tests")
    return incident, new_key(old.authority)


def backdate(key: SigningKey, days: int = 30) -> SigningKey:
    """Let ``key`` have signed in the past (its validity starts ``days`` ago)."""
    SigningKey.objects.filter(pk=key.pk).update(not_before=timezone.now() - timedelta(days=days))
    key.refresh_from_db()
    return key


def bulk_signed(
    key: SigningKey,
    n: int,
    *,
    start: datetime,
    step: timedelta,
    prefix: str = "model",
) -> list[Signature]:
    """``n`` signed requests of ``key``'s authority, one signature every ``step`` from ``start``.

    Each bundle is the service's statement for its request, signed by ``key`` on the HSM.
    """
    policy_digest = current_policy().digest
    requests = [_request(key.authority, f"{prefix}-{i}", policy_digest) for i in range(n)]
    SigningRequest.objects.bulk_create(requests, batch_size=2000)
    backend = registry.backend_for(key)
    rows = []
    for i, req in enumerate(requests):
        at = start + i * step
        payload = bundle.statement_payload(
            signing._signed_statement(req, key, at.isoformat(), signing.base_statement(req))
        )
        der = backend.sign(key.key_ref, bundle.pae(payload))
        built = bundle.build_bundle(payload, der, hint=key.hint)
        sig = Signature(
            request=req, key=key, payload_digest=bundle.payload_digest(payload), signed_at=at
        )
        rows.append((sig, bundle.bundle_bytes(built).decode()))
    return Signature.objects.store_many(rows)


def _request(authority: str, model: str, policy_digest: str) -> SigningRequest:
    resources = [
        Resource(
            name="weights.bin",
            algorithm="sha256",
            digest=hashlib.sha256(model.encode()).hexdigest(),
        )
    ]
    req = SigningRequest(
        authority=authority,
        model_name=model,
        model_version="1.0",
        resources=[r.to_json() for r in resources],
        ignore_paths=sorted(DEFAULT_IGNORE_PATHS),
        policy_digest=policy_digest,
        required_approvals=0,
        state=RequestState.SIGNED,
        requester=CI_IDENTITY,
        body_digest=hashlib.sha256(model.encode()).hexdigest(),
        signed_at=timezone.now(),
    )
    req.root_digest = bundle.build_statement(model, resources)["subject"][0]["digest"]["sha256"]
    req.statement_digest = signing.statement_digest(req)
    return req


def supersedes_entry(sig: Signature) -> dict[str, Any]:
    """The ``supersedes`` entry of a (re-signed) bundle's service metadata."""
    envelope = json.loads(sig.bundle)["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    meta: dict[str, Any] = statement["predicate"][bundle.SERVICE_PREDICATE_KEY]
    return meta.get("supersedes") or {}


def wait_for(done: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
