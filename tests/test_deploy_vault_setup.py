"""deploy/vault/: the service's Vault policy grants exactly sign, verify and read on its key,
and setup.py makes a Vault (the tests' transit server, which enforces AppRole policies) ready
for the service: the service's own backend signs with the AppRole it creates, and that
AppRole can do nothing else."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
from hvac import exceptions as hv

from keys.backends.vault import VaultTransitBackend
from tests.redis_fixtures import ROOT
from tests.vault_transit_server import VaultTransitServer, _parse_policy, _policy_rules

SETUP = ROOT / "deploy" / "vault" / "setup.py"
POLICY = ROOT / "deploy" / "vault" / "modelsign-policy.hcl"
CEREMONY_POLICY = ROOT / "deploy" / "vault" / "modelsign-ceremony-policy.hcl"


def test_the_policy_grants_sign_verify_and_read_on_one_key_and_nothing_else() -> None:
    text = POLICY.read_text()
    rules = _parse_policy(text, strict=True)
    assert sorted(rules) == sorted(
        [
            ("transit/sign/modelsign-staging", ["update"]),
            ("transit/verify/modelsign-staging", ["update"]),
            ("transit/keys/modelsign-staging", ["read"]),
        ]
    )
    # No globs, no other blocks or stanzas the parser might not see.
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "*" not in code and "+" not in code
    assert len(re.findall(r"\bpath\b", code)) == 3
    assert len(re.findall(r"\bcapabilities\b", code)) == 3


def test_the_ceremony_policy_creates_rotates_and_configures_one_key_within_bounds() -> None:
    text = CEREMONY_POLICY.read_text()
    rules = {r.pattern: r for r in _policy_rules(text, strict=True)}
    assert set(rules) == {
        "transit/keys/modelsign-staging",
        "transit/keys/modelsign-staging/rotate",
        "transit/keys/modelsign-staging/config",
    }
    key, rotate, config = rules.values()
    assert sorted(key.capabilities) == ["create", "read", "update"]
    assert key.allowed_parameters == {
        "type": ["ecdsa-p256"], "exportable": [False], "allow_plaintext_backup": [False],
    }  # fmt: skip
    assert rotate.capabilities == ["update"] and rotate.allowed_parameters is None
    assert config.capabilities == ["update"]
    assert config.allowed_parameters == {"min_encryption_version": []}
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "*" not in code and "+" not in code and "/sign/" not in code
    assert len(re.findall(r"\bpath\b", code)) == 3


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultTransitServer]:
    with VaultTransitServer(mounted=False) as server:
        yield server


def setup(
    vault: VaultTransitServer, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    admin = tmp_path / "admin-token"
    admin.write_text(vault.token + "\n")
    return subprocess.run(
        [sys.executable, str(SETUP), "--addr", vault.url, "--admin-token-file", str(admin),
         "--secret-id-out", str(tmp_path / "secret_id"),
         "--ceremony-secret-id-out", str(tmp_path / "ceremony_secret_id"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def role_id(output: str) -> str:
    found = re.search(r"^VAULT_ROLE_ID=(\S+)$", output, re.MULTILINE)
    assert found, output
    return found.group(1)


def test_setup_prepares_vault_and_the_service_signs_with_only_that(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    done = setup(vault, tmp_path)
    assert done.returncode == 0, done.stderr
    secret_id = (tmp_path / "secret_id").read_text().strip()
    ceremony_secret_id = (tmp_path / "ceremony_secret_id").read_text().strip()
    for out in ("secret_id", "ceremony_secret_id"):
        assert (tmp_path / out).stat().st_mode & 0o777 == 0o600
    assert secret_id != ceremony_secret_id
    assert secret_id not in done.stdout + done.stderr
    assert ceremony_secret_id not in done.stdout + done.stderr
    assert "VAULT_KEY_STAGING=modelsign-staging" in done.stdout.splitlines()
    assert vault.policies["modelsign-staging-ceremony"] == CEREMONY_POLICY.read_text()
    assert vault.roles["modelsign-ceremony"]["policies"] == ["modelsign-staging-ceremony"]
    key = vault.keys["modelsign-staging"]
    assert (key.type, key.exportable, key.allow_plaintext_backup) == ("ecdsa-p256", False, False)
    assert vault.policies["modelsign-staging"] == POLICY.read_text()
    assert vault.roles["modelsign"]["policies"] == ["modelsign-staging"]

    # The service's own backend, with the AppRole setup made: it reads and signs.
    backend = VaultTransitBackend(
        vault.url, "transit", role_id=role_id(done.stdout), secret_id=secret_id
    )
    ref = {"name": "modelsign-staging", "version": 1, "mount": "transit"}
    backend.public_key(ref).verify(backend.sign(ref, b"payload"), b"payload", *_ecdsa_sha256())

    # And nothing else: not another key, not create, rotate, config or export.
    client = hvac.Client(url=vault.url)
    client.auth.approle.login(role_id=role_id(done.stdout), secret_id=secret_id)
    for refused in (
        lambda: client.secrets.transit.create_key(name="other", key_type="ecdsa-p256"),
        lambda: client.secrets.transit.rotate_key(name="modelsign-staging"),
        lambda: client.secrets.transit.update_key_configuration(
            name="modelsign-staging", min_encryption_version=1
        ),
        lambda: client.secrets.transit.export_key(name="modelsign-staging", key_type="signing-key"),
        lambda: client.secrets.transit.read_key(name="other"),
        lambda: client.secrets.transit.create_key(name="modelsign-staging", key_type="ecdsa-p256"),
        lambda: client.sys.create_or_update_policy(name="modelsign", policy='path "*" {}'),
    ):
        with pytest.raises(hv.Forbidden):
            refused()


def login(vault: VaultTransitServer, role: str, secret_file: Path) -> hvac.Client:
    client = hvac.Client(url=vault.url)
    client.auth.approle.login(
        role_id=vault.roles[role]["role_id"], secret_id=secret_file.read_text().strip()
    )
    return client


def test_the_ceremony_approle_rotates_and_raises_min_encryption_version_and_nothing_more(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    done = setup(vault, tmp_path)
    assert done.returncode == 0, done.stderr
    ceremony = login(vault, "modelsign-ceremony", tmp_path / "ceremony_secret_id")
    transit = ceremony.secrets.transit
    # What ceremonies do: read, rotate, raise min_encryption_version.
    assert transit.read_key(name="modelsign-staging")["data"]["latest_version"] == 1
    transit.rotate_key(name="modelsign-staging")
    transit.update_key_configuration(name="modelsign-staging", min_encryption_version=2)
    key = vault.keys["modelsign-staging"]
    assert (key.latest_version, key.min_encryption_version) == (2, 2)
    refused = [
        lambda: transit.sign_data(name="modelsign-staging", hash_input="aGk=", key_version=2),
        lambda: transit.verify_signed_data(
            name="modelsign-staging", hash_input="aGk=", signature="vault:v2:AAAA"
        ),
        lambda: transit.export_key(name="modelsign-staging", key_type="signing-key"),
        lambda: transit.update_key_configuration(name="modelsign-staging", exportable=True),
        lambda: transit.update_key_configuration(
            name="modelsign-staging", allow_plaintext_backup=True
        ),
        lambda: transit.update_key_configuration(name="modelsign-staging", deletion_allowed=True),
        lambda: transit.update_key_configuration(
            name="modelsign-staging", min_decryption_version=2
        ),
        # The key's own path takes only the creation parameters, and only safe values.
        lambda: transit.create_key(
            name="modelsign-staging", key_type="ecdsa-p256", exportable=True
        ),
        lambda: transit.create_key(name="modelsign-staging", key_type="aes256-gcm96"),
        lambda: transit.create_key(name="modelsign-staging", key_type="ecdsa-p256", derived=True),
        lambda: transit.create_key(name="other", key_type="ecdsa-p256", exportable=False),
        lambda: transit.rotate_key(name="other"),
        lambda: transit.read_key(name="other"),
    ]
    for call in refused:
        with pytest.raises(hv.Forbidden):
            call()
    assert (key.exportable, key.allow_plaintext_backup, key.deletion_allowed) == (False,) * 3
    assert (key.latest_version, key.min_decryption_version) == (2, 1)


def test_the_ceremony_approle_creates_the_key_only_non_exportable(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    done = setup(vault, tmp_path)
    assert done.returncode == 0, done.stderr
    del vault.keys["modelsign-staging"]  # a Vault with the policies and roles only
    transit = login(vault, "modelsign-ceremony", tmp_path / "ceremony_secret_id").secrets.transit
    for unsafe in ({"exportable": True}, {"allow_plaintext_backup": True}):
        with pytest.raises(hv.Forbidden):
            transit.create_key(name="modelsign-staging", key_type="ecdsa-p256", **unsafe)
    with pytest.raises(hv.Forbidden):
        transit.create_key(name="modelsign-staging", key_type="ecdsa-p384")
    assert "modelsign-staging" not in vault.keys
    transit.create_key(
        name="modelsign-staging", key_type="ecdsa-p256", exportable=False,
        allow_plaintext_backup=False,
    )  # fmt: skip
    assert vault.keys["modelsign-staging"].exportable is False


def _ecdsa_sha256() -> tuple[object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return (ec.ECDSA(hashes.SHA256()),)


def test_a_second_run_keeps_the_key_and_issues_a_new_secret_id(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    first = setup(vault, tmp_path)
    assert first.returncode == 0, first.stderr
    old_secret = (tmp_path / "secret_id").read_text()
    old_ceremony_secret = (tmp_path / "ceremony_secret_id").read_text()
    public = vault.keys["modelsign-staging"].public_pem(1)
    again = setup(vault, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "ceremony_secret_id").read_text() != old_ceremony_secret
    assert vault.roles["modelsign-ceremony"]["policies"] == ["modelsign-staging-ceremony"]
    assert "already enabled" in again.stdout and "exists (ecdsa-p256" in again.stdout
    assert vault.keys["modelsign-staging"].latest_version == 1
    assert vault.keys["modelsign-staging"].public_pem(1) == public
    assert role_id(again.stdout) == role_id(first.stdout)
    assert (tmp_path / "secret_id").read_text() != old_secret


def test_another_mount_and_key_get_a_policy_for_them(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    vault.mount = "signing"
    done = setup(vault, tmp_path, "--mount", "signing", "--key", "ml-staging")
    assert done.returncode == 0, done.stderr
    assert sorted(_parse_policy(vault.policies["modelsign-staging"])) == sorted(
        [
            ("signing/sign/ml-staging", ["update"]),
            ("signing/verify/ml-staging", ["update"]),
            ("signing/keys/ml-staging", ["read"]),
        ]
    )
    assert "VAULT_TRANSIT_MOUNT=signing" in done.stdout
    assert [r.pattern for r in _policy_rules(vault.policies["modelsign-staging-ceremony"])] == [
        "signing/keys/ml-staging",
        "signing/keys/ml-staging/rotate",
        "signing/keys/ml-staging/config",
    ]
    assert "VAULT_KEY_STAGING=ml-staging" in done.stdout.splitlines()


def test_each_authority_adds_its_policies_to_the_same_two_roles(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    assert setup(vault, tmp_path).returncode == 0
    done = setup(vault, tmp_path, "--authority", "ml-prod")
    assert done.returncode == 0, done.stderr
    assert "VAULT_KEY_ML_PROD=modelsign-ml-prod" in done.stdout.splitlines()
    assert set(vault.keys) == {"modelsign-staging", "modelsign-ml-prod"}
    assert vault.roles["modelsign"]["policies"] == ["modelsign-staging", "modelsign-ml-prod"]
    assert vault.roles["modelsign-ceremony"]["policies"] == [
        "modelsign-staging-ceremony",
        "modelsign-ml-prod-ceremony",
    ]


def test_one_role_for_signing_and_ceremonies_is_refused(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    done = setup(vault, tmp_path, "--ceremony-role", "modelsign")
    assert done.returncode == 1
    assert "--role and --ceremony-role must differ" in done.stderr
    assert vault.calls == []


def test_an_exportable_key_of_that_name_is_refused(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    vault.mounted = True
    hvac.Client(url=vault.url, token=vault.token).secrets.transit.create_key(
        name="modelsign-staging", key_type="ecdsa-p256", exportable=True
    )
    done = setup(vault, tmp_path)
    assert done.returncode == 1
    assert "transit key 'modelsign-staging' exists but is exportable: not usable" in done.stderr
    assert vault.policies == {} and not (tmp_path / "secret_id").exists()


def test_a_bad_key_name_is_refused_before_anything_is_sent(
    vault: VaultTransitServer, tmp_path: Path
) -> None:
    done = setup(vault, tmp_path, "--key", "../sys/policy/x")
    assert done.returncode == 1
    assert "--key '../sys/policy/x'" in done.stderr
    assert vault.calls == []
