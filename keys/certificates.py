"""Org-CA certificates for key-based authorities (HSM or Vault keys).

The private key never leaves its backend, so the CSR is assembled with asn1crypto and its
CertificationRequestInfo is signed through the backend like any other payload. Once the
org CA's chain is attached, bundles carry ``x509CertificateChain`` (leaf first) instead of
``publicKey.hint``, and verify with ``model_signing verify certificate``.

What the reference verifier (model-signing 1.1.1, ``sign_certificate.Verifier``) requires,
and :func:`check_chain` therefore enforces before a chain is stored:

* it builds the chain with OpenSSL from the bundle's certificates (leaf first, the rest
  untrusted) up to a *self-signed root* passed with ``--certificate_chain`` (no partial
  chains: trusting only an intermediate fails), so every issuer must be a CA
  (basicConstraints CA:TRUE, keyCertSign if it has a keyUsage, path length respected),
  signed with SHA-256 or stronger (OpenSSL 3 rejects SHA-1), with no unknown critical
  extension;
* it checks validity at the leaf's notBefore, not at verification time: every issuer
  must already be valid when the leaf's validity starts;
* the leaf must have keyUsage digitalSignature or, failing that, extendedKeyUsage
  codeSigning; its key must be EC P-256/384/521 (ours always is).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import TypeVar

from asn1crypto import csr as acsr
from asn1crypto import keys as akeys
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from django.db import transaction
from django.utils import timezone

from keys.models import KeyState, SigningKey
from keys.registry import backend_for
from signing_service import audit, bundle

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)

DEFAULT_SUBJECT = "CN=modelsign {authority} signing key"

#: The CSR signature algorithm follows the curve: backends hash with the curve's hash.
_CSR_ALGORITHM = {
    "secp256r1": "sha256_ecdsa",
    "secp384r1": "sha384_ecdsa",
    "secp521r1": "sha512_ecdsa",
}
#: OpenSSL 3's default security level refuses these in a chain.
_WEAK_HASHES = ("md5", "sha1")
#: A retired or revoked key must not be given a new identity.
_CERTIFIABLE = (KeyState.PENDING, KeyState.ACTIVE, KeyState.TRANSITION)


class CertificateError(ValueError):
    """The request or the chain is not acceptable; the message says why, for an operator."""


# --- resolving keys ---------------------------------------------------------------------


def resolve_key(ref: str) -> SigningKey:
    """A key by numeric id, else by a unique prefix of its hint."""
    ref = ref.strip().lower()
    if ref.isdigit():
        key = SigningKey.objects.filter(pk=int(ref)).first()
        if key is not None:
            return key
    if len(ref) < 4:
        raise CertificateError(f"no key with id {ref!r}; give an id or at least 4 hint characters")
    matches = list(SigningKey.objects.filter(hint__startswith=ref)[:2])
    if not matches:
        raise CertificateError(f"no key with id or hint prefix {ref!r}")
    if len(matches) > 1:
        raise CertificateError(f"hint prefix {ref!r} matches several keys; give more characters")
    return matches[0]


def _require_certifiable(key: SigningKey) -> None:
    if key.state not in _CERTIFIABLE:
        raise CertificateError(f"key {key} is {key.state}: it cannot get a certificate")


# --- CSR --------------------------------------------------------------------------------


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 subject such as ``CN=...,O=...``."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise CertificateError(f"bad subject {text!r}: {exc}") from None
    if not name.rdns:
        raise CertificateError("the subject is empty")
    return name


def _requested_extensions() -> ax509.Extensions:
    """What the CA should put in the leaf so the reference verifier accepts it."""
    return ax509.Extensions(
        [
            {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
            {
                "extn_id": "key_usage",
                "critical": True,
                "extn_value": ax509.KeyUsage({"digital_signature"}),
            },
            {"extn_id": "extended_key_usage", "critical": False, "extn_value": ["code_signing"]},
        ]
    )


def build_csr(key: SigningKey, subject: str | None = None) -> x509.CertificateSigningRequest:
    """A PKCS#10 CSR for ``key``, signed by the key inside its backend."""
    _require_certifiable(key)
    public = bundle.load_public_key(key.public_key_pem)
    name = parse_subject(subject or DEFAULT_SUBJECT.format(authority=key.authority))
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = acsr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": ax509.Name.load(name.public_bytes()),
            "subject_pk_info": akeys.PublicKeyInfo.load(spki),
            "attributes": [{"type": "extension_request", "values": [_requested_extensions()]}],
        }
    )
    signature = backend_for(key).sign(key.key_ref, info.dump())
    request = acsr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": _CSR_ALGORITHM[public.curve.name]},
            "signature": signature,
        }
    )
    csr = x509.load_der_x509_csr(request.dump())
    # Fail closed if the backend signed with another key or the encoding is off.
    if not csr.is_signature_valid or _spki(csr.public_key()) != spki:
        raise CertificateError("the key backend produced a CSR that does not verify")
    return csr


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


# --- chains -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedChain:
    """A chain that passed :func:`check_chain`; ``stored`` is what bundles will carry."""

    leaf: x509.Certificate
    stored: list[x509.Certificate]
    root: x509.Certificate | None
    warnings: list[str] = field(default_factory=list)

    @property
    def pem(self) -> str:
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.stored
        )

    def summary(self) -> dict[str, object]:
        return {
            "subject": self.leaf.subject.rfc4514_string(),
            "issuer": self.leaf.issuer.rfc4514_string(),
            "not_after": self.leaf.not_valid_after_utc.isoformat(),
            "fingerprints": [_fingerprint(c) for c in self.stored],
            "root_fingerprint": _fingerprint(self.root) if self.root is not None else None,
        }


def load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(
            f"the chain file holds no readable PEM certificates: {exc}"
        ) from None
    return certs


def check_chain(
    key: SigningKey, certs: Sequence[x509.Certificate], at: datetime | None = None
) -> CheckedChain:
    """Check ``certs`` (leaf first) against ``key`` and the reference verifier's rules."""
    if not certs:
        raise CertificateError("the chain is empty")
    at = at or timezone.now()
    leaf = certs[0]
    _check_leaf_key(key, certs)
    _check_leaf_usage(leaf)
    for position, cert in enumerate(certs):
        _check_cert(cert, position, at, leaf.not_valid_before_utc)
    for position, (child, issuer) in enumerate(pairwise(certs)):
        _check_issued(child, issuer, position)
        _check_ca(issuer, position + 1, ca_below=position)
    root = certs[-1] if len(certs) > 1 and _self_signed(certs[-1]) else None
    # Trust must come from the verifier's own copy of the root, so bundles do not carry it.
    stored = list(certs[:-1]) if root is not None else list(certs)
    warnings = []
    if key.not_after is not None and leaf.not_valid_after_utc < key.not_after:
        warnings.append(
            f"the certificate expires ({leaf.not_valid_after_utc:%Y-%m-%d}) before the key "
            f"({key.not_after:%Y-%m-%d}); attach a renewed one in time"
        )
    return CheckedChain(leaf=leaf, stored=stored, root=root, warnings=warnings)


def _check_leaf_key(key: SigningKey, certs: Sequence[x509.Certificate]) -> None:
    want = _spki(bundle.load_public_key(key.public_key_pem))
    if _spki(certs[0].public_key()) == want:
        return
    if any(_spki(c.public_key()) == want for c in certs[1:]):
        raise CertificateError("the key's certificate is not first: put the leaf first")
    raise CertificateError(
        f"the leaf certificate ({certs[0].subject.rfc4514_string()}) is for another public "
        f"key, not key {key.hint[:16]}: it was not issued from this key's CSR"
    )


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise CertificateError("the leaf's keyUsage must include digitalSignature")
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    code_signing = eku is not None and ExtendedKeyUsageOID.CODE_SIGNING in eku
    # The reference verifier's rule: keyUsage digitalSignature, or else EKU codeSigning.
    if usage is None and not code_signing:
        raise CertificateError(
            "the leaf needs keyUsage digitalSignature (or extendedKeyUsage codeSigning); "
            "model_signing refuses it otherwise"
        )


def _check_cert(cert: x509.Certificate, position: int, at: datetime, leaf_start: datetime) -> None:
    what = _describe(cert, position)
    if not cert.not_valid_before_utc <= at < cert.not_valid_after_utc:
        raise CertificateError(
            f"{what} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
        )
    # The reference verifier checks the whole chain at the leaf's notBefore.
    if position and not cert.not_valid_before_utc <= leaf_start < cert.not_valid_after_utc:
        raise CertificateError(f"{what} is not yet valid when the leaf's validity starts")
    algorithm = cert.signature_hash_algorithm
    if algorithm is not None and algorithm.name in _WEAK_HASHES:
        raise CertificateError(f"{what} is signed with {algorithm.name}, which verifiers refuse")
    for ext in cert.extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise CertificateError(
                f"{what} has an unknown critical extension {ext.oid.dotted_string}"
            )


def _check_issued(child: x509.Certificate, issuer: x509.Certificate, position: int) -> None:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise CertificateError(
            f"broken chain: {_describe(child, position)} was not issued by the next "
            f"certificate, {_describe(issuer, position + 1)} ({exc or 'bad signature'}); "
            "give leaf, then each issuer in order"
        ) from None


def _check_ca(issuer: x509.Certificate, position: int, *, ca_below: int) -> None:
    """``ca_below``: intermediate CAs between this issuer and the leaf (for pathLen)."""
    what = _describe(issuer, position)
    constraints = _extension(issuer, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{what} issued a certificate but is not a CA (basicConstraints)")
    if constraints.path_length is not None and ca_below > constraints.path_length:
        raise CertificateError(f"{what} has pathLen {constraints.path_length}: chain too long")
    usage = _extension(issuer, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise CertificateError(f"{what} may not sign certificates (keyUsage keyCertSign)")


# --- attaching --------------------------------------------------------------------------


def attach_chain(
    key: SigningKey, pem: bytes, *, actor: str, at: datetime | None = None
) -> CheckedChain:
    """Check the PEM chain (leaf first) and store it on ``key``, audited in one transaction."""
    _require_certifiable(key)
    checked = check_chain(key, load_chain(pem), at)
    with transaction.atomic():
        # Locked: a concurrent revocation must not be overtaken by this change.
        locked = SigningKey.objects.select_for_update().get(pk=key.pk)
        _require_certifiable(locked)
        locked.certificate_chain_pem = checked.pem
        locked.save(update_fields=["certificate_chain_pem"])
        audit.record(
            actor,
            "key.certificate_attached",
            target=locked,
            data={"authority": locked.authority, "hint": locked.hint, **checked.summary()},
        )
    key.certificate_chain_pem = checked.pem
    return checked


def audit_csr(key: SigningKey, csr: x509.CertificateSigningRequest, *, actor: str) -> None:
    """The key signed something other than a model: record what."""
    with transaction.atomic():
        audit.record(
            actor,
            "key.csr_created",
            target=key,
            data={
                "authority": key.authority,
                "hint": key.hint,
                "subject": csr.subject.rfc4514_string(),
                "csr_sha256": hashlib.sha256(
                    csr.public_bytes(serialization.Encoding.DER)
                ).hexdigest(),
            },
        )


# --- helpers ----------------------------------------------------------------------------


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _describe(cert: x509.Certificate, position: int) -> str:
    role = "the leaf" if position == 0 else f"certificate #{position + 1}"
    return f"{role} ({cert.subject.rfc4514_string()})"
