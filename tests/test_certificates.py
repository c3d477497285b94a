"""Org-CA certificates for HSM keys: CSR, attaching the chain, and certificate bundles.

The test plays the org CA (a root and an intermediate made with cryptography). The bundles
the service signs afterwards must verify with the reference `model_signing verify
certificate` against the root, and fail against another root or a changed model.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.management import call_command
from django.core.management.base import CommandError

from keys.models import SigningKey
from signing_service.bundle import BUNDLE_MEDIA_TYPE, bundle_certificates, parse_bundle
from signing_service.models import AuditEntry
from tests.fixtures_service import authed, request_body, write_model

pytestmark = [pytest.mark.softhsm, pytest.mark.interop, pytest.mark.django_db(transaction=True)]

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(
    cn: str, parent: Ca | None = None, *, ca: bool = True, age: timedelta = timedelta(days=1)
) -> Ca:
    """A root (no parent) or an intermediate, valid from ``age`` ago."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(parent.cert.subject if parent else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - age)
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, ca, ca, False, False), critical=True
        )
    )
    signer = parent.key if parent else key
    return Ca(builder.sign(signer, hashes.SHA256()), key)


def issue_leaf(
    csr: x509.CertificateSigningRequest, issuer: Ca, *, usages: bool = True
) -> x509.Certificate:
    """What the org CA does with our CSR: the leaf model_signing needs (see key_csr --help)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_csr(
    key: SigningKey, tmp_path: Path, ref: str | None = None, *extra: str
) -> x509.CertificateSigningRequest:
    out = tmp_path / f"key-{key.pk}.csr"
    call_command("key_csr", ref or str(key.pk), "--out", str(out), "--actor", "tests", *extra)
    return x509.load_pem_x509_csr(out.read_bytes())


def attach(key: SigningKey, chain: bytes, tmp_path: Path) -> None:
    path = write(tmp_path / "chain.pem", chain)
    call_command("key_certificate", key.hint[:12], "--chain", str(path), "--actor", "tests")


def verify_certificate(
    model: Path, signature: Path, root: Path
) -> subprocess.CompletedProcess[str]:
    """The reference verifier; without --certificate_chain it would trust certifi's roots."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "certificate", str(model),
         "--signature", str(signature), "--certificate_chain", str(root)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


@pytest.fixture
def pki() -> tuple[Ca, Ca]:
    root = make_ca("Example Root CA")
    return root, make_ca("Example Signing CA", root)


def test_csr_is_signed_by_the_key_and_carries_it(active_keys: Any, tmp_path: Path) -> None:
    key = active_keys["staging"]
    csr = make_csr(key, tmp_path)
    assert csr.is_signature_valid
    assert (
        csr.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        == key.public_key_pem
    )
    assert csr.subject.rfc4514_string() == "CN=modelsign staging signing key"
    requested = csr.extensions.get_extension_for_class(x509.KeyUsage).value
    assert requested.digital_signature
    # By unique hint prefix, with a subject of the operator's choosing.
    csr = make_csr(key, tmp_path, key.hint[:10], "--subject", "CN=staging models,O=Example Org")
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Example Org"
    assert AuditEntry.objects.filter(action="key.csr_created", target_id=str(key.pk)).count() == 2
    with pytest.raises(CommandError, match="no key with id or hint prefix"):
        call_command("key_csr", "ffffffffffff")


def test_wrong_leaf_and_broken_chains_are_refused(
    active_keys: Any, pki: tuple[Ca, Ca], tmp_path: Path
) -> None:
    root, intermediate = pki
    key = active_keys["staging"]
    other = issue_leaf(make_csr(active_keys["production"], tmp_path), intermediate)
    leaf = issue_leaf(make_csr(key, tmp_path), intermediate)
    stranger = make_ca("Some Other CA")
    cases = {
        "for another public key": pem(other, intermediate.cert, root.cert),
        "put the leaf first": pem(intermediate.cert, leaf, root.cert),
        "broken chain": pem(leaf, stranger.cert),
        "keyUsage digitalSignature": pem(
            issue_leaf(make_csr(key, tmp_path), intermediate, usages=False), intermediate.cert
        ),
        "no readable PEM": b"not a certificate",
    }
    # model_signing checks the chain at the leaf's notBefore: an issuer younger than the
    # leaf is refused here rather than by every verifier later.
    young = make_ca("Young CA", root, age=timedelta(minutes=10))
    cases |= {
        "not yet valid when the leaf's validity starts": pem(
            issue_leaf(make_csr(key, tmp_path), young), young.cert, root.cert
        ),
    }
    for message, chain in cases.items():
        with pytest.raises(CommandError, match=message):
            attach(key, chain, tmp_path)
    key.refresh_from_db()
    assert key.certificate_chain_pem == ""
    assert not AuditEntry.objects.filter(action="key.certificate_attached").exists()


def test_not_a_ca_issuer_in_the_chain_is_refused(
    active_keys: Any, pki: tuple[Ca, Ca], tmp_path: Path
) -> None:
    root, _ = pki
    key = active_keys["staging"]
    not_ca = make_ca("Not A CA", root, ca=False)
    chain = pem(issue_leaf(make_csr(key, tmp_path), not_ca), not_ca.cert, root.cert)
    with pytest.raises(CommandError, match=r"Not A CA.*is not a CA"):
        attach(key, chain, tmp_path)


def sign_via_api(api: Any, token: str, model: Path, signature: Path) -> dict[str, Any]:
    response = authed(api, token).post(
        "/api/v1/signing-requests/", request_body(model), format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["state"] == "signed", response.json()
    got = authed(api, token).get(f"/api/v1/signing-requests/{response.json()['id']}/bundle")
    assert got.status_code == 200
    assert got["Content-Type"] == BUNDLE_MEDIA_TYPE
    signature.write_bytes(got.content)
    return parse_bundle(got.content)


def test_certificate_bundles_verify_with_model_signing(
    active_keys: Any, pki: tuple[Ca, Ca], tmp_path: Path, api: Any, issue_token: Any
) -> None:
    root, intermediate = pki
    key = active_keys["staging"]
    leaf = issue_leaf(make_csr(key, tmp_path), intermediate)
    attach(key, pem(leaf, intermediate.cert, root.cert), tmp_path)
    key.refresh_from_db()
    # The root is checked but not stored: verifiers must bring their own copy.
    assert key.certificate_chain_pem.encode() == pem(leaf, intermediate.cert)
    entry = AuditEntry.objects.get(action="key.certificate_attached", target_id=str(key.pk))
    assert entry.data["fingerprints"][0] == leaf.fingerprint(hashes.SHA256()).hex()

    model = write_model(tmp_path / "model", {"config.json": b"{}", "weights/w.bin": b"w" * 4096})
    signature = tmp_path / "model.sig"
    bundle = sign_via_api(api, issue_token(), model, signature)
    material = bundle["verificationMaterial"]
    assert "publicKey" not in material
    raw = [
        base64.b64decode(c["rawBytes"]) for c in material["x509CertificateChain"]["certificates"]
    ]
    assert raw == [c.public_bytes(serialization.Encoding.DER) for c in (leaf, intermediate.cert)]
    assert bundle_certificates(bundle)[0] == leaf

    root_pem = write(tmp_path / "root.pem", pem(root.cert))
    result = verify_certificate(model, signature, root_pem)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout

    other_root = write(tmp_path / "other-root.pem", pem(make_ca("Example Root CA").cert))
    result = verify_certificate(model, signature, other_root)
    assert result.returncode != 0
    assert "Verification failed" in result.stderr

    (model / "weights" / "w.bin").write_bytes(b"w" * 4095 + b"x")
    result = verify_certificate(model, signature, root_pem)
    assert result.returncode != 0
    assert "Verification failed" in result.stderr
