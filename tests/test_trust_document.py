"""GET /api/v1/trust/: every non-pending key, signed by each active key, one version per
content, never served unsigned."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rest_framework.test import APIClient

from keys.backends.base import BackendUnavailable
from keys.lifecycle import transition
from keys.models import KeyState, SigningKey
from signing_service import bundle
from signing_service import trust as server_trust
from signing_service.client.trust import TRUST_PAYLOAD_TYPE
from signing_service.models import AuditEntry, TrustDocument
from signing_service.policy import current_policy

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]

KEY_FIELDS = {
    "authority", "hint", "algorithm", "public_key_pem", "state", "not_before", "not_after",
    "transition_until", "revoked_at", "revocation_effective_at", "revocation_reason",
}  # fmt: skip


def get_trust(api: APIClient) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """(raw bytes, envelope, decoded document) of a successful GET."""
    response = api.get("/api/v1/trust/")
    assert response.status_code == 200, response.content
    envelope = json.loads(response.content)
    assert set(envelope) == {"payloadType", "payload", "signatures"}
    assert envelope["payloadType"] == TRUST_PAYLOAD_TYPE
    return response.content, envelope, json.loads(base64.b64decode(envelope["payload"]))


def software_key(authority: str, state: str) -> SigningKey:
    """A key row without an HSM behind it: only its public half is ever used here."""
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    return SigningKey.objects.create(
        authority=authority, backend="pkcs11", key_ref={"token": "none", "id": "x"},
        public_key_pem=bundle.public_key_pem(public), hint=bundle.key_hint(public), state=state,
    )  # fmt: skip


def verifies(key: SigningKey, envelope: dict[str, Any]) -> bool:
    public = serialization.load_pem_public_key(key.public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signed = bundle.pae(base64.b64decode(envelope["payload"]), TRUST_PAYLOAD_TYPE)
    for sig in envelope["signatures"]:
        if sig["keyid"] == key.hint:
            public.verify(base64.b64decode(sig["sig"]), signed, ec.ECDSA(hashes.SHA256()))
            return True
    return False


def test_lists_every_non_pending_key_with_its_fields(api: APIClient, active_keys: Any) -> None:
    retired = software_key("staging", KeyState.RETIRED)
    revoked = software_key("production", KeyState.RETIRED)
    transition(revoked.pk, KeyState.REVOKED, actor="custodian", reason="compromised")
    pending = software_key("production", KeyState.PENDING)
    _, _, doc = get_trust(api)
    assert doc["type"] == "modelsign-trust"
    assert isinstance(doc["version"], int) and doc["version"] >= 1
    assert doc["issued_at"]
    listed = {k["hint"]: k for k in doc["keys"]}
    expected = [*active_keys.values(), retired, revoked]
    assert set(listed) == {k.hint for k in expected}
    assert pending.hint not in listed
    for key in expected:
        key.refresh_from_db()
        entry = listed[key.hint]
        assert set(entry) == KEY_FIELDS
        assert entry["authority"] == key.authority
        assert entry["state"] == key.state
        assert entry["algorithm"] == key.algorithm
        assert entry["public_key_pem"] == key.public_key_pem
        assert entry["not_before"] == key.not_before.isoformat()
        assert entry["not_after"] == (key.not_after.isoformat() if key.not_after else None)
        assert entry["transition_until"] is None  # none of them is in transition
    assert listed[revoked.hint]["revocation_reason"] == "compromised"
    assert listed[revoked.hint]["revocation_effective_at"] is not None


def test_authorities_and_verification_policy_come_from_the_policy(
    api: APIClient, active_keys: Any
) -> None:
    _, _, doc = get_trust(api)
    policy = current_policy()
    assert doc["authorities"] == {
        name: {"requires_approval": a.requires_approval, "approval_count": a.approval_count}
        for name, a in policy.authorities.items()
    }
    assert set(doc["verification_policy"]) == set(policy.verification)
    for name, rule in policy.verification.items():
        assert doc["verification_policy"][name] == {
            "require_signature": rule.require_signature,
            "accepted_authorities": list(rule.accepted_authorities),
            "require_provenance": rule.require_provenance,
            "max_signature_age_days": rule.max_signature_age_days,
        }


def test_signed_by_each_active_key_and_no_other(api: APIClient, active_keys: Any) -> None:
    old = software_key("staging", KeyState.RETIRED)
    _, envelope, _ = get_trust(api)
    assert len(envelope["signatures"]) == len(active_keys)
    for key in active_keys.values():
        assert verifies(key, envelope), f"no signature by {key}"
    assert not verifies(old, envelope)


def test_one_version_per_content_and_signed_once(
    api: APIClient, active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_signing(monkeypatch)
    first, _, doc1 = get_trust(api)
    second, _, doc2 = get_trust(api)
    assert first == second  # the same bytes: stored once, served as stored
    assert doc1["version"] == doc2["version"]
    assert len(calls) == len(active_keys)
    assert TrustDocument.objects.count() == 1

    staging = active_keys["staging"]
    transition(staging.pk, KeyState.TRANSITION, actor="custodian")
    _, envelope, doc3 = get_trust(api)
    assert doc3["version"] == doc1["version"] + 1
    entry = next(k for k in doc3["keys"] if k["hint"] == staging.hint)
    assert entry["state"] == "transition"
    entered = AuditEntry.objects.get(action="key.transition", target_id=str(staging.pk))
    days = current_policy().key_management.transition_days
    assert entry["transition_until"] == (entered.created_at + timedelta(days=days)).isoformat()
    assert not verifies(staging, envelope)  # a transition key no longer signs
    assert get_trust(api)[2]["version"] == doc3["version"]


def test_a_policy_change_is_a_new_version(
    api: APIClient, active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = get_trust(api)[2]["version"]
    changed = dataclasses.replace(current_policy(), digest="f" * 64)
    monkeypatch.setattr(server_trust, "current_policy", lambda: changed)
    assert get_trust(api)[2]["version"] == version + 1


def test_no_active_key_is_503(api: APIClient, hsm: Any) -> None:
    software_key("staging", KeyState.RETIRED)
    response = api.get("/api/v1/trust/")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "trust_unavailable"
    assert "no active signing key" in error["message"]
    assert not TrustDocument.objects.exists()


def test_after_the_last_active_key_is_revoked_nothing_stale_is_served(
    api: APIClient, active_keys: Any
) -> None:
    get_trust(api)
    for key in active_keys.values():
        transition(key.pk, KeyState.REVOKED, actor="custodian", reason="compromised")
    assert api.get("/api/v1/trust/").status_code == 503


def test_a_down_backend_is_skipped_and_its_signature_added_later(
    api: APIClient, active_keys: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    production = active_keys["production"]
    real = server_trust.backend_for
    down = {production.hint}

    def flaky(key: SigningKey) -> Any:
        if key.hint in down:
            raise BackendUnavailable("token 'production' not present")
        return real(key)

    monkeypatch.setattr(server_trust, "backend_for", flaky)
    _, envelope, doc = get_trust(api)
    assert {s["keyid"] for s in envelope["signatures"]} == {
        active_keys["staging"].hint,
        active_keys["development"].hint,
    }
    down.clear()
    settings.TRUST_RESIGN_SECONDS = 0
    _, envelope2, doc2 = get_trust(api)
    assert doc2["version"] == doc["version"]  # same document, one more signature
    assert verifies(production, envelope2)
    assert len(envelope2["signatures"]) == 3


def test_no_working_backend_is_503_and_nothing_is_stored(
    api: APIClient, active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(key: SigningKey) -> Any:
        raise BackendUnavailable(f"{key.authority} HSM unreachable")

    monkeypatch.setattr(server_trust, "backend_for", down)
    response = api.get("/api/v1/trust/")
    assert response.status_code == 503
    assert "HSM unreachable" in response.json()["error"]["message"]
    assert not TrustDocument.objects.exists()


def test_a_backend_signing_with_the_wrong_key_is_not_trusted(
    api: APIClient, active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    imposter = ec.generate_private_key(ec.SECP256R1())
    real = server_trust.backend_for

    class Wrong:
        def sign(self, key_ref: Any, data: bytes) -> bytes:
            return imposter.sign(data, ec.ECDSA(hashes.SHA256()))

    monkeypatch.setattr(
        server_trust, "backend_for", lambda k: Wrong() if k.authority == "staging" else real(k)
    )
    _, envelope, _ = get_trust(api)
    assert active_keys["staging"].hint not in {s["keyid"] for s in envelope["signatures"]}
    assert len(envelope["signatures"]) == 2


def test_schema_documents_the_endpoint(api: APIClient, db: None) -> None:
    response = api.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    assert "/api/v1/trust/" in json.loads(response.content)["paths"]


def count_signing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every signing call made for the trust document."""
    calls: list[str] = []
    real = server_trust.backend_for

    class Counting:
        def __init__(self, key: SigningKey) -> None:
            self.inner = real(key)
            self.hint = key.hint

        def sign(self, key_ref: Any, data: bytes) -> bytes:
            calls.append(self.hint)
            return self.inner.sign(key_ref, data)

    monkeypatch.setattr(server_trust, "backend_for", Counting)
    return calls
