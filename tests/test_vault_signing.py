"""An authority on Vault transit signs through the API; a sealed Vault never falls back."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keys import registry
from keys.lifecycle import register_key
from signing_service.models import Signature
from tests import vault_transit_server
from tests.fixtures_service import authed, model_signing_verify, request_body, write_model

vault_server = vault_transit_server.vault_server
pytestmark = [pytest.mark.django_db, pytest.mark.interop]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def vault_staging(
    vault_server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The policy of SPEC section 3 (staging on Vault), wired to the test Vault."""
    token_file = tmp_path / "vault-token"
    token_file.write_text(vault_server.token + "\n")
    monkeypatch.setenv("VAULT_TOKEN_FILE", str(token_file))
    settings.VAULT_ADDR = vault_server.url
    settings.SIGNING_POLICY_FILE = str(ROOT / "deploy" / "policy.example.yaml")
    registry.reset()
    backend = registry.vault_backend()
    key = register_key(
        "staging", backend, backend.generate("modelsign-staging"), algorithm="ECDSA-P256",
        validity=timedelta(days=91), actor="tests", activate=True,
    )  # fmt: skip
    yield key
    registry.reset()


def test_a_vault_key_signs_and_model_signing_verifies(
    api: Any, issue_token: Any, vault_staging: Any, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "m", {"weights.bin": b"w" * 1000, "cfg/a.json": b"{}"})
    client = authed(api, issue_token())
    response = client.post("/api/v1/signing-requests/", request_body(model), format="json")
    assert response.status_code == 201 and response.json()["state"] == "signed", response.content
    sig = tmp_path / "model.sig"
    sig.write_bytes(client.get(f"/api/v1/signing-requests/{response.json()['id']}/bundle").content)
    pem = tmp_path / "key.pem"
    pem.write_text(vault_staging.public_key_pem)
    result = model_signing_verify(model, sig, pem)
    assert result.returncode == 0, result.stderr
    assert vault_staging.key_ref["version"] == 1


def test_a_sealed_vault_makes_the_request_wait_and_it_is_signed_after_unseal(
    api: Any, issue_token: Any, vault_staging: Any, vault_server: Any
) -> None:
    from signing_service import signing

    vault_server.seal()
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json"
    )
    body = response.json()
    assert body["state"] == "approved"  # waiting, not failed, and no other key stepped in
    assert "sealed" in body["waiting_reason"]
    assert not Signature.objects.exists()
    assert signing.sign(body["id"]).state == "approved"  # a retry while sealed still waits
    vault_server.unseal()
    signed = signing.sign(body["id"])  # what the worker's retry or reconciler does
    assert signed.state == "signed" and signed.waiting_reason == ""
    assert Signature.objects.get(request=signed).key_id == vault_staging.pk


def test_a_ceremony_on_vault_rotates_the_transit_key_and_pins_the_new_version(
    api: Any, issue_token: Any, vault_staging: Any, make_user: Any
) -> None:
    from django.contrib.auth.models import Group
    from django.utils import timezone

    from approvals.groups import custodian_group
    from keys import ceremonies
    from keys.models import KeyState, SigningKey

    users = []
    for name in ("kim", "lee"):
        user = make_user(name, approves=())
        user.groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
        users.append(user)
    c = ceremonies.open_ceremony("staging", users[0], otp_verified_at=timezone.now())
    new = ceremonies.confirm(c.pk, users[1], otp_verified_at=timezone.now()).key
    assert new is not None
    assert new.key_ref == {**vault_staging.key_ref, "version": 2}
    assert SigningKey.objects.get(pk=vault_staging.pk).state == KeyState.TRANSITION
    body = (
        authed(api, issue_token())
        .post("/api/v1/signing-requests/", request_body(), format="json")
        .json()
    )
    assert body["state"] == "signed" and body["key"]["hint"] == new.hint
