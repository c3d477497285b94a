"""Vault transit backend against the transit test server (SPEC sections 6, 9 and 11).

No Vault binary is available here; ``tests/vault_transit_server.py`` implements the
endpoints with real ECDSA keys, and the last tests drive it with hvac directly so the
server stays honest.
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hvac
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hvac import exceptions as hv

from keys.backends.base import BackendUnavailable, KeyNotUsable
from keys.backends.vault import VaultTransitBackend, token_from_file
from signing_service.bundle import pae
from tests import vault_transit_server
from tests.vault_transit_server import VaultTransitServer

# The fixture lives next to the server it starts; bound here so pytest finds it.
vault_server = vault_transit_server.vault_server

PAE = pae(b'{"_type": "https://in-toto.io/Statement/v1", "subject": []}')


def backend(server: VaultTransitServer) -> VaultTransitBackend:
    return VaultTransitBackend(server.url, token=server.token, timeout=5)


def hvac_client(server: VaultTransitServer) -> hvac.Client:
    return hvac.Client(url=server.url, token=server.token, timeout=5)


def verifies(public_key: ec.EllipticCurvePublicKey, der: bytes, data: bytes = PAE) -> bool:
    try:
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- generate, sign, verify ---------------------------------------------------------------


def test_generate_sign_verify(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    generated = b.generate("prod-2025")

    assert generated.key_ref == {"name": "prod-2025", "version": 1, "mount": "transit"}
    key = vault_server.keys["prod-2025"]
    assert (key.type, key.exportable, key.allow_plaintext_backup) == ("ecdsa-p256", False, False)
    assert generated.attributes["exportable"] is False
    assert generated.attributes["allow_plaintext_backup"] is False

    der = b.sign(generated.key_ref, PAE)
    public = b.public_key(generated.key_ref)
    assert verifies(public, der)
    assert not verifies(public, der, PAE + b"x")
    assert public.public_numbers() == generated.public_key.public_numbers()
    # Exactly the request SPEC section 9 asks for: hashed here, pinned, DER back.
    assert vault_server.sign_requests[-1] == {
        "input": b64(hashlib.sha256(PAE).digest()),
        "key_version": 1,
        "hash_algorithm": "sha2-256",
        "prehashed": True,
        "marshaling_algorithm": "asn1",
    }


def test_p384_uses_sha384(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = b.generate("p384", "ECDSA-P384").key_ref
    der = b.sign(ref, PAE)
    b.public_key(ref).verify(der, PAE, ec.ECDSA(hashes.SHA384()))
    assert vault_server.keys["p384"].type == "ecdsa-p384"
    assert vault_server.sign_requests[-1]["hash_algorithm"] == "sha2-384"


def test_check_usable_reports_checked_fields(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = b.generate("audited").key_ref
    facts = b.check_usable(ref)
    assert facts["type"] == "ecdsa-p256"
    assert facts["exportable"] is False and facts["allow_plaintext_backup"] is False
    assert facts["version"] == 1 and facts["latest_version"] == 1
    der = b.public_key(ref).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert facts["public_key_sha256"] == hashlib.sha256(der).hexdigest()
    with pytest.raises(KeyNotUsable, match="must be 'ecdsa-p384'"):
        b.check_usable({**ref, "algorithm": "ECDSA-P384"})


def test_generate_refuses_existing_key(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    b.generate("taken")
    with pytest.raises(KeyNotUsable, match="already exists"):
        b.generate("taken")
    # A key someone created as exportable is refused, and left exactly as it was.
    hvac_client(vault_server).secrets.transit.create_key(
        name="sneaky", key_type="ecdsa-p256", exportable=True
    )
    with pytest.raises(KeyNotUsable, match="already exists"):
        b.generate("sneaky")
    assert vault_server.keys["sneaky"].exportable is True


@pytest.mark.parametrize("label", ["../sys/seal", "a b", "", "x/y", "-lead"])
def test_generate_refuses_bad_names(vault_server: VaultTransitServer, label: str) -> None:
    with pytest.raises(KeyNotUsable, match="transit key names"):
        backend(vault_server).generate(label)
    assert vault_server.keys == {}


def test_unsupported_algorithm(vault_server: VaultTransitServer) -> None:
    with pytest.raises(KeyNotUsable, match="unsupported algorithm"):
        backend(vault_server).generate("k", "RSA-2048")


# --- rotation and pinning -----------------------------------------------------------------


def test_rotation_keeps_old_signatures_and_pins_versions(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    v1 = b.generate("rotating").key_ref
    v1_public = b.public_key(v1)
    sig_v1 = b.sign(v1, PAE)

    v2 = b.rotate(v1)

    assert v2 == {"name": "rotating", "version": 2, "mount": "transit"}
    key = vault_server.keys["rotating"]
    assert (key.latest_version, key.min_encryption_version, key.min_decryption_version) == (2, 2, 1)
    # The signature made before rotation still verifies with v1's public key ...
    assert verifies(b.public_key(v1), sig_v1)
    assert b.public_key(v1).public_numbers() == v1_public.public_numbers()
    # ... and Vault still verifies it too (min_decryption_version stays 1).
    client = hvac_client(vault_server)
    answer = client.secrets.transit.verify_signed_data(
        name="rotating", hash_input=b64(PAE), signature="vault:v1:" + b64(sig_v1)
    )
    assert answer["data"]["valid"] is True

    # The new key_ref signs with v2, and only v2's public key verifies it.
    sig_v2 = b.sign(v2, PAE)
    assert vault_server.sign_requests[-1]["key_version"] == 2
    assert verifies(b.public_key(v2), sig_v2)
    assert not verifies(v1_public, sig_v2)
    assert b.public_key(v2).public_numbers() != v1_public.public_numbers()


def test_old_version_cannot_sign_after_rotation(vault_server: VaultTransitServer) -> None:
    """Vault refuses key_version below min_encryption_version (as HTTP 500: #20713)."""
    b = backend(vault_server)
    v1 = b.generate("retired").key_ref
    b.sign(v1, PAE)
    v2 = b.rotate(v1)

    with pytest.raises(KeyNotUsable, match="less than the minimum encryption key version"):
        b.sign(v1, PAE)
    with pytest.raises(KeyNotUsable, match="below min_encryption_version 2"):
        b.check_usable(v1)
    assert b.check_usable(v2)["min_encryption_version"] == 2
    # Never "latest": the old ref did not quietly sign with v2.
    assert [r["key_version"] for r in vault_server.sign_requests] == [1, 1]


@pytest.mark.parametrize(
    "key_ref",
    [
        {"name": "k", "mount": "transit"},
        {"name": "k", "version": 0, "mount": "transit"},
        {"name": "k", "version": "1", "mount": "transit"},
        {"name": "k", "version": True, "mount": "transit"},
        {"name": "k", "version": 1, "mount": "other"},
    ],
)
def test_unpinned_or_foreign_key_refs_are_refused(
    vault_server: VaultTransitServer, key_ref: dict[str, object]
) -> None:
    b = backend(vault_server)
    b.generate("k")
    with pytest.raises(KeyNotUsable):
        b.sign(key_ref, PAE)
    assert vault_server.sign_requests == []


def test_version_beyond_latest_is_refused(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    b.generate("k")
    with pytest.raises(KeyNotUsable, match="version 5 does not exist"):
        b.sign({"name": "k", "version": 5, "mount": "transit"}, PAE)


def test_recreated_key_is_detected(vault_server: VaultTransitServer) -> None:
    """A key deleted and re-created under the same name must not sign in the old one's name."""
    b = backend(vault_server)
    ref = b.generate("phoenix").key_ref
    b.sign(ref, PAE)
    del vault_server.keys["phoenix"]
    hvac_client(vault_server).secrets.transit.create_key(name="phoenix", key_type="ecdsa-p256")

    with pytest.raises(KeyNotUsable, match="does not verify"):
        b.sign(ref, PAE)
    with pytest.raises(KeyNotUsable, match="changed since this process first read it"):
        b.public_key(ref)


# --- keys that must not be used -------------------------------------------------------------


def test_export_is_refused(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    b.generate("secret")
    client = hvac_client(vault_server)
    with pytest.raises(hv.InvalidRequest, match="not exportable"):
        client.secrets.transit.export_key(name="secret", key_type="signing-key")
    with pytest.raises(hv.InvalidRequest, match="not exportable"):
        client.secrets.transit.export_key(name="secret", key_type="signing-key", version="latest")
    # Only the public half comes out.
    public = client.adapter.get("/v1/transit/export/public-key/secret")  # hvac has no helper
    assert "PUBLIC KEY" in public["data"]["keys"]["1"]


def test_unknown_key(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = {"name": "ghost", "version": 1, "mount": "transit"}
    for call in (b.sign, lambda r, *_: b.public_key(r), lambda r, *_: b.check_usable(r)):
        with pytest.raises(KeyNotUsable, match="no transit key 'ghost'"):
            call(ref, PAE)
    with pytest.raises(KeyNotUsable, match="no transit key 'ghost'"):
        b.rotate(ref)


@pytest.mark.parametrize("flag", ["exportable", "allow_plaintext_backup"])
def test_exportable_key_is_refused(vault_server: VaultTransitServer, flag: str) -> None:
    hvac_client(vault_server).secrets.transit.create_key(
        name="leaky", key_type="ecdsa-p256", **{flag: True}
    )
    b = backend(vault_server)
    ref = {"name": "leaky", "version": 1, "mount": "transit"}
    with pytest.raises(KeyNotUsable, match=f"{flag} is true"):
        b.check_usable(ref)
    with pytest.raises(KeyNotUsable, match=f"{flag} is true"):
        b.sign(ref, PAE)
    assert vault_server.sign_requests == []


def test_key_made_exportable_later_is_refused(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = b.generate("turned").key_ref
    b.check_usable(ref)
    # Vault lets anyone with the policy flip exportable on (never off) via keys/:name/config.
    hvac_client(vault_server).secrets.transit.update_key_configuration(
        name="turned", exportable=True
    )
    with pytest.raises(KeyNotUsable, match="exportable is true"):
        b.check_usable(ref)


def test_wrong_key_type_is_refused(vault_server: VaultTransitServer) -> None:
    hvac_client(vault_server).secrets.transit.create_key(name="big", key_type="ecdsa-p521")
    b = backend(vault_server)
    with pytest.raises(KeyNotUsable, match="must be 'ecdsa-p256'"):
        b.check_usable({"name": "big", "version": 1, "mount": "transit", "algorithm": "ECDSA-P256"})


# --- outages and authentication ----------------------------------------------------------


def test_wrong_token_is_unavailable_without_leaking_it(vault_server: VaultTransitServer) -> None:
    ref = backend(vault_server).generate("k").key_ref
    secret = "hvs.THIS-TOKEN-MUST-NEVER-BE-SHOWN"
    b = VaultTransitBackend(vault_server.url, token=secret, timeout=5)
    with pytest.raises(BackendUnavailable, match="refused authentication") as info:
        b.sign(ref, PAE)
    health = b.health()
    assert not health.ok and "refused authentication" in health.detail
    for text in (str(info.value), repr(info.value), health.detail, repr(b)):
        assert secret not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_sealed_vault_then_recovery(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = b.generate("k").key_ref
    assert b.health().ok

    vault_server.seal()
    with pytest.raises(BackendUnavailable, match="sealed"):
        b.sign(ref, PAE)
    with pytest.raises(BackendUnavailable, match="sealed"):
        b.check_usable(ref)
    health = b.health()
    assert not health.ok and "sealed" in health.detail

    vault_server.unseal()
    assert verifies(b.public_key(ref), b.sign(ref, PAE))
    assert b.health().ok


def test_uninitialized_vault(vault_server: VaultTransitServer) -> None:
    vault_server.initialized = False
    health = backend(vault_server).health()
    assert not health.ok and "not initialized" in health.detail


def test_unreachable_vault() -> None:
    server = VaultTransitServer().start()
    b = backend(server)
    ref = b.generate("k").key_ref
    b.sign(ref, PAE)
    server.stop()

    with pytest.raises(BackendUnavailable, match="cannot reach Vault"):
        b.sign(ref, PAE)
    health = b.health()
    assert not health.ok and "cannot reach Vault" in health.detail
    server.stop()  # idempotent


def test_approle_login_and_relogin(vault_server: VaultTransitServer) -> None:
    b = VaultTransitBackend(
        vault_server.url,
        role_id=vault_server.role_id,
        secret_id=vault_server.secret_id,
        timeout=5,
    )
    assert vault_server.logins == 0  # lazy: constructing the backend does not call Vault
    ref = b.generate("approle-key").key_ref
    assert verifies(b.public_key(ref), b.sign(ref, PAE))
    assert vault_server.logins == 1
    assert b.health().ok

    # The AppRole token expires or is revoked: the backend logs in again, once.
    for token in list(vault_server.tokens - {vault_server.token}):
        vault_server.revoke(token)
    assert verifies(b.public_key(ref), b.sign(ref, PAE))
    assert vault_server.logins == 2


def test_approle_bad_secret_is_unavailable_without_leaking_it(
    vault_server: VaultTransitServer,
) -> None:
    secret_id = "a9d6f1b0-0000-4000-8000-MUST-NOT-LEAK"
    b = VaultTransitBackend(
        vault_server.url, role_id=vault_server.role_id, secret_id=secret_id, timeout=5
    )
    with pytest.raises(BackendUnavailable, match=r"AppRole login .* failed") as info:
        b.generate("k")
    assert secret_id not in str(info.value)
    assert secret_id not in b.health().detail


def test_static_token_is_not_retried_on_403(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = b.generate("k").key_ref
    vault_server.revoke(vault_server.token)
    with pytest.raises(BackendUnavailable, match="refused authentication"):
        b.sign(ref, PAE)
    assert vault_server.logins == 0


def test_constructor_needs_exactly_one_credential() -> None:
    with pytest.raises(ValueError, match="either"):
        VaultTransitBackend("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="either"):
        VaultTransitBackend("http://127.0.0.1:1", token="t", role_id="r", secret_id="s")
    with pytest.raises(ValueError, match="both"):
        VaultTransitBackend("http://127.0.0.1:1", role_id="r")


def test_environment_token_is_never_used(
    vault_server: VaultTransitServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hvac would fall back to VAULT_TOKEN; an AppRole backend must not."""
    monkeypatch.setenv("VAULT_TOKEN", vault_server.token)
    b = VaultTransitBackend(
        vault_server.url, role_id=vault_server.role_id, secret_id="wrong", timeout=5
    )
    with pytest.raises(BackendUnavailable, match="AppRole login"):
        b.generate("k")


# --- token files ------------------------------------------------------------------------


def test_token_from_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("hvs.abc\n")
    assert token_from_file(path) == "hvs.abc"
    path.write_bytes(b"hvs.abc\r\n")
    assert token_from_file(path) == "hvs.abc"
    path.write_text("hvs.abc")
    assert token_from_file(str(path)) == "hvs.abc"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("", "is empty"), ("\n", "is empty"), ("hvs.a b\n", "whitespace")],
)
def test_token_from_file_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BackendUnavailable, match=message) as info:
        token_from_file(path)
    assert "hvs.a" not in str(info.value)


# --- the test server, driven by hvac itself -----------------------------------------------


def test_hvac_sign_and_verify_against_the_server(vault_server: VaultTransitServer) -> None:
    client = hvac_client(vault_server)
    created = client.secrets.transit.create_key(name="h", key_type="ecdsa-p256")
    assert created["data"]["keys"]["1"]["name"] == "P-256"
    transit = client.secrets.transit

    # Vault hashes the input itself (default sha2-256) ...
    signed = transit.sign_data(name="h", hash_input=b64(b"hello"))
    signature = signed["data"]["signature"]
    assert signature.startswith("vault:v1:") and signed["data"]["key_version"] == 1
    assert transit.verify_signed_data(name="h", hash_input=b64(b"hello"), signature=signature)[
        "data"
    ]["valid"]
    assert not transit.verify_signed_data(name="h", hash_input=b64(b"hellO"), signature=signature)[
        "data"
    ]["valid"]
    # ... and the DER inside verifies with the published public key, outside Vault.
    public = VaultTransitBackend(vault_server.url, token=vault_server.token).public_key(
        {"name": "h", "version": 1, "mount": "transit"}
    )
    assert verifies(public, base64.b64decode(signature.split(":")[2]), b"hello")

    # Prehashed and JWS (r||s, URL-safe base64) round trips.
    digest = b64(hashlib.sha256(b"model").digest())
    jws = transit.sign_data(
        name="h", hash_input=digest, prehashed=True, marshaling_algorithm="jws"
    )["data"]["signature"]
    assert len(base64.urlsafe_b64decode(jws.split(":")[2] + "==")) == 64
    assert transit.verify_signed_data(
        name="h", hash_input=digest, prehashed=True, marshaling_algorithm="jws", signature=jws
    )["data"]["valid"]
    assert (
        transit.verify_signed_data(name="h", hash_input=b64(b"model"), signature=signature)["data"][
            "valid"
        ]
        is False
    )


def test_hvac_key_management_against_the_server(vault_server: VaultTransitServer) -> None:
    transit = hvac_client(vault_server).secrets.transit
    transit.create_key(name="m", key_type="ecdsa-p256")
    # Creating an existing key is a no-op with a warning, as in Vault.
    again = transit.create_key(name="m", key_type="ecdsa-p384", exportable=True)
    assert again["warnings"] == ["key m already existed"]
    assert again["data"]["type"] == "ecdsa-p256" and again["data"]["exportable"] is False

    with pytest.raises(hv.InvalidPath) as missing:
        transit.read_key(name="absent")
    assert missing.value.errors == []
    with pytest.raises(hv.InvalidRequest, match="cannot set min encryption version of 2"):
        transit.update_key_configuration(name="m", min_encryption_version=2)
    with pytest.raises(hv.InvalidRequest, match="key not found"):
        transit.rotate_key(name="absent")
    with pytest.raises(hv.InvalidRequest, match="signing key not found"):
        transit.sign_data(name="absent", hash_input=b64(b"x"))

    rotated = transit.rotate_key(name="m")
    assert rotated["data"]["latest_version"] == 2
    transit.update_key_configuration(name="m", min_encryption_version=2)
    data = transit.read_key(name="m")["data"]
    assert (data["min_encryption_version"], data["min_decryption_version"]) == (2, 1)
    assert set(data["keys"]) == {"1", "2"}
    assert "BEGIN PUBLIC KEY" in data["keys"]["2"]["public_key"]
    # Signing with an old version: Vault's user error comes back as HTTP 500.
    with pytest.raises(hv.InternalServerError, match="less than the minimum encryption"):
        transit.sign_data(name="m", hash_input=b64(b"x"), key_version=1)
    assert transit.sign_data(name="m", hash_input=b64(b"x"))["data"]["signature"].startswith(
        "vault:v2:"
    )
    # Raising min_decryption_version stops old signatures from verifying.
    old = transit.sign_data(name="m", hash_input=b64(b"x"), key_version=2)["data"]["signature"]
    transit.update_key_configuration(name="m", min_decryption_version=2)
    with pytest.raises(hv.InvalidRequest, match="too old"):
        transit.verify_signed_data(name="m", hash_input=b64(b"x"), signature="vault:v1:AAAA")
    assert transit.verify_signed_data(name="m", hash_input=b64(b"x"), signature=old)["data"][
        "valid"
    ]


def test_hvac_auth_and_seal_against_the_server(vault_server: VaultTransitServer) -> None:
    anonymous = hvac.Client(url=vault_server.url, token="", timeout=5)
    with pytest.raises(hv.Forbidden, match="permission denied"):
        anonymous.secrets.transit.read_key(name="x")
    with pytest.raises(hv.Forbidden, match="invalid token"):
        hvac.Client(url=vault_server.url, token="nope").secrets.transit.read_key(name="x")
    with pytest.raises(hv.InvalidRequest, match="invalid role or secret ID"):
        anonymous.auth.approle.login(role_id=vault_server.role_id, secret_id="wrong")
    login = anonymous.auth.approle.login(
        role_id=vault_server.role_id, secret_id=vault_server.secret_id
    )
    assert anonymous.token == login["auth"]["client_token"]
    assert anonymous.auth.token.lookup_self()["data"]["policies"]

    assert anonymous.sys.read_health_status().status_code == 200  # HEAD
    vault_server.seal()
    health = anonymous.sys.read_health_status(method="GET")
    assert health.status_code == 503 and health.json()["sealed"] is True
    with pytest.raises(hv.VaultDown, match="Vault is sealed"):
        anonymous.secrets.transit.read_key(name="x")
    with pytest.raises(hv.VaultDown, match="Vault is sealed"):
        anonymous.auth.approle.login(role_id=vault_server.role_id, secret_id=vault_server.secret_id)


def test_signature_from_another_version_is_refused(
    vault_server: VaultTransitServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend checks the vault:vN: prefix against the pinned version."""
    b = backend(vault_server)
    ref = b.generate("k").key_ref
    real_sign = vault_transit_server._sign

    def relabel(*args: object, **kwargs: object) -> dict[str, object]:
        answer = real_sign(*args, **kwargs)  # type: ignore[arg-type]
        return {**answer, "signature": answer["signature"].replace("vault:v1:", "vault:v7:")}

    monkeypatch.setattr(vault_transit_server, "_sign", relabel)
    with pytest.raises(KeyNotUsable, match="not the pinned version 1"):
        b.sign(ref, PAE)


def test_concurrent_signing(vault_server: VaultTransitServer) -> None:
    b = backend(vault_server)
    ref = b.generate("busy").key_ref
    public = b.public_key(ref)
    messages = [pae(b"statement %d" % i) for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        signatures = list(pool.map(lambda m: b.sign(ref, m), messages))
    assert all(verifies(public, sig, m) for sig, m in zip(signatures, messages, strict=True))
