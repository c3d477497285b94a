"""Key ceremonies on Vault under the least-privilege policies of deploy/vault/: the service
signs with the AppRole of modelsign-policy.hcl, ceremonies run with the AppRole of
modelsign-ceremony-policy.hcl, both as deploy/vault/setup.py makes them (real hvac against
the tests' transit server, which enforces the policies; real ECDSA; model_signing verifies).

Cases: the key setup.py made is adopted by rotating it at the quorum; a missing key is
created at the quorum; later ceremonies rotate; an exportable key, a pinned key that is gone
and a half-configured ceremony credential are refused and nothing is recorded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from approvals.groups import custodian_group
from keys import ceremonies, registry
from keys.models import CeremonyState, KeyCeremony, KeyState, SigningKey
from signing_service.models import AuditEntry
from signing_service.signing import SigningRefused
from tests.fixtures_service import authed, model_signing_verify, request_body, write_model
from tests.vault_transit_server import VaultTransitServer

pytestmark = [pytest.mark.django_db, pytest.mark.interop]
ROOT = Path(__file__).resolve().parent.parent
KEY = "modelsign-staging"


def _load_setup() -> Any:
    spec = importlib.util.spec_from_file_location("vault_setup", ROOT / "deploy/vault/setup.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vault_setup = _load_setup()


@pytest.fixture
def vault() -> Iterator[VaultTransitServer]:
    with VaultTransitServer(mounted=False) as server:
        yield server


@pytest.fixture
def service(
    vault: VaultTransitServer, tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[VaultTransitServer]:
    """setup.py run by the administrator, and the service wired as it prints: the signing
    AppRole for everything, the ceremony AppRole for ceremonies."""
    admin = tmp_path / "admin-token"
    admin.write_text(vault.token + "\n")
    runtime, ceremony = tmp_path / "secret_id", tmp_path / "ceremony_secret_id"
    assert vault_setup.main(
        ["--addr", vault.url, "--admin-token-file", str(admin), "--authority", "staging",
         "--secret-id-out", str(runtime), "--ceremony-secret-id-out", str(ceremony)]
    ) == 0  # fmt: skip
    settings.VAULT_ADDR = vault.url
    settings.VAULT_ROLE_ID = vault.roles["modelsign"]["role_id"]
    settings.VAULT_CEREMONY_ROLE_ID = vault.roles["modelsign-ceremony"]["role_id"]
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(runtime))
    monkeypatch.setenv("VAULT_CEREMONY_SECRET_ID_FILE", str(ceremony))
    monkeypatch.delenv("VAULT_TOKEN_FILE", raising=False)
    settings.SIGNING_POLICY_FILE = str(ROOT / "deploy" / "policy.example.yaml")
    registry.reset()
    yield vault
    registry.reset()


@pytest.fixture
def quorum(make_user: Any) -> list[Any]:
    users = []
    for name in ("kim", "lee"):
        user = make_user(name, approves=())
        user.groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
        users.append(user)
    return users


def run_ceremony(quorum: list[Any]) -> SigningKey:
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    key = ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now()).key
    assert key is not None
    return key


def transcript(key: SigningKey) -> dict[str, Any]:
    return AuditEntry.objects.get(action="key.activated", target_id=str(key.pk)).data["vault"]


def test_the_first_ceremony_adopts_the_key_setup_made_by_rotating_it_at_the_quorum(
    service: VaultTransitServer, quorum: list[Any], api: Any, issue_token: Any, tmp_path: Path
) -> None:
    made_by_setup = service.keys[KEY].public_pem(1)
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    assert service.keys[KEY].latest_version == 1  # nothing happens before the quorum
    key = ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now()).key
    assert key is not None and key.state == KeyState.ACTIVE

    assert key.key_ref == {"name": KEY, "version": 2, "mount": "transit"}
    vault_key = service.keys[KEY]
    assert (vault_key.latest_version, vault_key.min_encryption_version) == (2, 2)
    assert key.public_key_pem.strip() == vault_key.public_pem(2).strip() != made_by_setup.strip()
    assert transcript(key) == {
        "case": "adopted", "vault_address": service.url, "mount": "transit", "transit_key": KEY,
        "version": 2, "latest_version_before": 1, "credential": "approle",
    }  # fmt: skip

    # The service signs with the signing AppRole, and model_signing verifies the bundle.
    model = write_model(tmp_path / "m", {"weights.bin": b"w" * 1000, "cfg/a.json": b"{}"})
    client = authed(api, issue_token())
    response = client.post("/api/v1/signing-requests/", request_body(model), format="json")
    assert response.json()["state"] == "signed", response.content
    assert response.json()["key"]["hint"] == key.hint
    sig = tmp_path / "model.sig"
    sig.write_bytes(client.get(f"/api/v1/signing-requests/{response.json()['id']}/bundle").content)
    pem = tmp_path / "key.pem"
    pem.write_text(key.public_key_pem)
    result = model_signing_verify(model, sig, pem)
    assert result.returncode == 0, result.stderr
    assert [r["key_version"] for r in service.sign_requests] == [2]
    # setup.py's version can no longer sign at all.
    with pytest.raises(hvac.exceptions.InternalServerError, match="minimum encryption"):
        hvac.Client(url=service.url, token=service.token).secrets.transit.sign_data(
            name=KEY, hash_input="aGk=", key_version=1
        )


def test_a_missing_key_is_created_at_the_quorum_and_later_ceremonies_rotate_it(
    service: VaultTransitServer, quorum: list[Any]
) -> None:
    del service.keys[KEY]  # a Vault prepared with policies and roles only
    first = run_ceremony(quorum)
    assert first.key_ref == {"name": KEY, "version": 1, "mount": "transit"}
    vault_key = service.keys[KEY]
    assert (vault_key.type, vault_key.exportable, vault_key.allow_plaintext_backup) == (
        "ecdsa-p256", False, False,
    )  # fmt: skip
    assert transcript(first)["case"] == "created"

    second = run_ceremony(quorum)
    assert second.key_ref == {"name": KEY, "version": 2, "mount": "transit"}
    assert service.keys[KEY].min_encryption_version == 2
    assert transcript(second) | {"vault_address": ""} == {
        "case": "rotated", "vault_address": "", "mount": "transit", "transit_key": KEY,
        "version": 2, "latest_version_before": 1, "credential": "approle",
    }  # fmt: skip
    assert SigningKey.objects.get(pk=first.pk).state == KeyState.TRANSITION


def assert_nothing_recorded(ceremony_id: Any) -> None:
    assert not SigningKey.objects.exists()
    assert not AuditEntry.objects.filter(action="key.activated").exists()
    ceremony = KeyCeremony.objects.get(pk=ceremony_id)
    assert ceremony.state == CeremonyState.OPEN and ceremony.confirmations.count() == 1


def test_an_exportable_key_is_refused_unchanged_and_nothing_is_recorded(
    service: VaultTransitServer, quorum: list[Any]
) -> None:
    # An administrator made the key exportable after setup.py (Vault never unsets that).
    hvac.Client(url=service.url, token=service.token).secrets.transit.update_key_configuration(
        name=KEY, exportable=True
    )
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    with pytest.raises(SigningRefused) as refused:
        ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now())
    assert refused.value.code == "key_backend"
    message = refused.value.message
    assert f"transit key {KEY!r} in mount 'transit'" in message
    assert "exportable is true (must be false)" in message and "Nothing was changed" in message
    assert service.keys[KEY].latest_version == 1  # not rotated
    assert_nothing_recorded(c.pk)


def test_a_pinned_key_that_is_gone_is_not_recreated(
    service: VaultTransitServer, quorum: list[Any]
) -> None:
    run_ceremony(quorum)
    del service.keys[KEY]  # deleted in Vault behind the service's back
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    with pytest.raises(SigningRefused, match="does not exist, but keys on record pin it"):
        ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now())
    assert KEY not in service.keys
    assert SigningKey.objects.count() == 1


def test_a_half_configured_ceremony_credential_is_refused_with_its_name(
    service: VaultTransitServer, quorum: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_CEREMONY_SECRET_ID_FILE")
    registry.reset()
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    with pytest.raises(SigningRefused, match="VAULT_CEREMONY_SECRET_ID_FILE is not set"):
        ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now())
    assert service.keys[KEY].latest_version == 1
    assert_nothing_recorded(c.pk)


def test_without_a_ceremony_credential_the_signing_one_is_used_and_refused(
    service: VaultTransitServer, quorum: list[Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback is real: the signing AppRole's policy cannot rotate, so a deployment that
    forgot the ceremony credential gets Vault's refusal, not a quietly unrotated key."""
    settings.VAULT_CEREMONY_ROLE_ID = ""
    monkeypatch.delenv("VAULT_CEREMONY_SECRET_ID_FILE")
    registry.reset()
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    with pytest.raises(SigningRefused, match="refused authentication to rotate"):
        ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now())
    assert service.keys[KEY].latest_version == 1
    assert_nothing_recorded(c.pk)


def test_a_transit_key_pinned_by_another_authority_is_refused(
    service: VaultTransitServer, quorum: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_ceremony(quorum)
    SigningKey.objects.filter(pk=first.pk).update(authority="production")
    c = ceremonies.open_ceremony("staging", quorum[0], otp_verified_at=timezone.now())
    with pytest.raises(SigningRefused, match=r"pinned by keys of 'production'.*VAULT_KEY_STAGING"):
        ceremonies.confirm(c.pk, quorum[1], otp_verified_at=timezone.now())
    assert service.keys[KEY].latest_version == 2
