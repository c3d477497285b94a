"""The signature format: in-toto statement, DSSE envelope, Sigstore bundle v0.3.

Everything here is checked against the OpenSSF `model_signing` 1.1.1 verifier (see
``tests/test_interop_model_signing.py``). This module imports nothing from Django: the
`modelsign` client uses it to verify bundles offline.

Guarantees:

* :func:`statement_payload` is deterministic: the same statement always gives the same bytes,
  so the SHA-256 of the payload can bind approvals to exactly what is signed;
* :func:`verify_bundle` fails closed: any shape, hint, signature or root-digest problem raises
  :class:`VerificationError`; it returns the statement only when everything checks out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote  # type: ignore[attr-defined]
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signing_service.manifest import (
    ALGORITHM,
    ManifestError,
    Resource,
    check_ignore_path,
    root_digest,
    sort_resources,
    validate_resources,
)

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: Our own metadata travels in the predicate under this key; `model_signing` ignores it.
SERVICE_PREDICATE_KEY = "https://modelsign.dev/service/v1"

_CURVE_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_CURVE_BYTES = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}


class BundleError(ValueError):
    """Base error for this module; the message says what is wrong."""


class VerificationError(BundleError):
    """The bundle, its signature or its statement does not verify."""


# --- statement -------------------------------------------------------------------------


def build_statement(
    model_name: str,
    resources: Sequence[Resource],
    *,
    ignore_paths: Iterable[str] = (),
    service_metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the in-toto Statement v1 that `model_signing` expects.

    Resources are sorted as `model_signing` sorts them; the subject digest is their root
    digest. ``service_metadata`` is stored under :data:`SERVICE_PREDICATE_KEY`.
    """
    ordered = sort_resources(resources)
    serialization_: dict[str, Any] = {
        "method": "files",
        "hash_type": ALGORITHM,
        "allow_symlinks": False,
        "ignore_paths": sorted(set(ignore_paths)),
    }
    predicate: dict[str, Any] = {
        "serialization": serialization_,
        "resources": [r.to_json() for r in ordered],
    }
    if service_metadata is not None:
        predicate[SERVICE_PREDICATE_KEY] = dict(service_metadata)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(ordered)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def statement_payload(statement: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes of a statement (sorted keys, no spaces, UTF-8)."""
    return json.dumps(
        statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# --- DSSE and signatures ---------------------------------------------------------------


def pae(payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    """DSSE pre-authentication encoding: the exact bytes that are signed."""
    ptype = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(ptype), ptype, len(payload), payload)


def curve_hash(public_key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    """The hash `model_signing` pairs with each curve (SHA-256 for P-256, ...)."""
    try:
        return _CURVE_HASH[public_key.curve.name]()
    except KeyError:
        raise BundleError(f"unsupported curve {public_key.curve.name}; use P-256/384/521") from None


def raw_to_der(raw: bytes, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Convert an HSM's raw ``r || s`` ECDSA signature to the DER form bundles carry."""
    return raw_ecdsa_to_der(raw, _CURVE_BYTES[public_key.curve.name])


def _der_heads(size: int) -> list[list[bytes]]:
    # [r needs a 0x00 pad][s needs one] -> SEQUENCE header, r's INTEGER header and pad.
    return [
        [
            bytes((0x30, 2 * size + 4 + r_pad + s_pad, 0x02, size + r_pad)) + b"\0" * r_pad
            for s_pad in (0, 1)
        ]
        for r_pad in (0, 1)
    ]


#: Precomputed DER framing for the common case of a curve whose SEQUENCE fits a one-byte
#: length (P-256, P-384) and r, s without leading zero bytes: r || s becomes four slices
#: joined, the same bytes as ``encode_dss_signature`` at a third of its cost (the
#: conversion is on every HSM signature's path).
_DER_FAST = {
    size: (_der_heads(size), [bytes((0x02, size)), bytes((0x02, size + 1, 0))]) for size in (32, 48)
}


def raw_ecdsa_to_der(raw: bytes, size: int) -> bytes:
    """DER ``SEQUENCE { INTEGER r, INTEGER s }`` of a raw ``r || s`` of ``size``-byte halves.

    Byte for byte what ``encode_dss_signature`` gives (minimal INTEGERs: leading zero bytes
    dropped, one 0x00 added where the top bit is set).
    """
    if len(raw) != 2 * size:
        raise BundleError(f"raw ECDSA signature must be {2 * size} bytes, got {len(raw)}")
    fast = _DER_FAST.get(size)
    if fast is not None and raw[0] and raw[size]:
        s_pad = raw[size] >> 7
        return b"".join((fast[0][raw[0] >> 7][s_pad], raw[:size], fast[1][s_pad], raw[size:]))
    r, s = _der_integer(raw[:size]), _der_integer(raw[size:])
    length = len(r) + len(s)
    head = bytes((0x30, length)) if length < 0x80 else bytes((0x30, 0x81, length))
    return head + r + s


def _der_integer(value: bytes) -> bytes:
    value = value.lstrip(b"\0")
    if not value or value[0] & 0x80:
        value = b"\0" + value
    return bytes((0x02, len(value))) + value


def der_to_raw(der: bytes, public_key: ec.EllipticCurvePublicKey) -> bytes:
    size = _CURVE_BYTES[public_key.curve.name]
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Lowercase hex SHA-256 of the SubjectPublicKeyInfo PEM text, as `model_signing` uses."""
    return hashlib.sha256(public_key_pem(public_key).encode("ascii")).hexdigest()


def load_public_key(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise BundleError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVE_HASH:
        raise BundleError("only EC P-256, P-384 and P-521 public keys are supported")
    return key


# --- bundle ----------------------------------------------------------------------------


def build_bundle(
    payload: bytes,
    signature_der: bytes,
    *,
    hint: str | None = None,
    certificate_chain_der: Sequence[bytes] = (),
) -> dict[str, Any]:
    """Assemble a Sigstore bundle v0.3 around a DSSE envelope with one signature.

    Give either ``hint`` (key signing) or ``certificate_chain_der`` (leaf first).
    """
    if bool(hint) == bool(certificate_chain_der):
        raise BundleError("give exactly one of hint or certificate_chain_der")
    material: dict[str, Any]
    if hint:
        material = {"publicKey": {"hint": hint}, "tlogEntries": []}
    else:
        certs = [{"rawBytes": _b64(c)} for c in certificate_chain_der]
        material = {"x509CertificateChain": {"certificates": certs}, "tlogEntries": []}
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {
            "payload": _b64(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": _b64(signature_der), "keyid": ""}],
        },
    }


def bundle_bytes(bundle: Mapping[str, Any]) -> bytes:
    return pretty_json(bundle).encode("utf-8") + b"\n"


def pretty_json(value: Any) -> str:
    """Exactly ``json.dumps(value, indent=2)``, several times faster.

    With ``indent`` the standard library leaves its C encoder for a generator per container,
    which cost about 0.1 ms per bundle, a tenth of re-signing's work per signature
    (docs/benchmarks.md). Strings go through the C quoting function, other scalars through
    ``json.dumps``; anything else (a dict with keys that are not strings, tuples in dict keys,
    objects ``json`` cannot encode) goes the standard way, with its result or its error.
    """
    try:
        return _pretty(value, "\n")
    except _NotPlain:
        return json.dumps(value, indent=2)


class _NotPlain(Exception):
    pass


def _pretty(value: Any, newline: str) -> str:
    if isinstance(value, str):
        return _quote(value)
    inner = newline + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        if not all(isinstance(k, str) for k in value):
            raise _NotPlain
        items = [_quote(k) + ": " + _pretty(v, inner) for k, v in value.items()]
        return "{" + inner + ("," + inner).join(items) + newline + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        return "[" + inner + ("," + inner).join(_pretty(v, inner) for v in value) + newline + "]"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    raise _NotPlain


@dataclass(frozen=True)
class VerifiedStatement:
    """What a verified bundle says: the statement and its parsed parts."""

    statement: dict[str, Any]
    payload: bytes
    model_name: str
    root_digest: str
    resources: list[Resource]
    ignore_paths: list[str]
    hint: str | None

    @property
    def service_metadata(self) -> dict[str, Any]:
        meta = self.statement["predicate"].get(SERVICE_PREDICATE_KEY)
        return meta if isinstance(meta, dict) else {}


def parse_bundle(data: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse and shape-check a bundle without verifying it."""
    if isinstance(data, bytes | str):
        try:
            bundle = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise BundleError(f"bundle is not JSON: {exc}") from None
    else:
        bundle = dict(data)
    if not isinstance(bundle, dict):
        raise BundleError("bundle must be a JSON object")
    if bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise BundleError(f"bundle mediaType must be {BUNDLE_MEDIA_TYPE!r}")
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict):
        raise BundleError("bundle has no dsseEnvelope")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs or not isinstance(sigs[0], dict):
        raise BundleError("dsseEnvelope has no signatures")
    if not isinstance(bundle.get("verificationMaterial"), dict):
        raise BundleError("bundle has no verificationMaterial")
    return bundle


def bundle_hint(bundle: Mapping[str, Any]) -> str | None:
    pk = bundle["verificationMaterial"].get("publicKey")
    hint = pk.get("hint") if isinstance(pk, dict) else None
    return hint if isinstance(hint, str) and hint else None


def bundle_certificates(bundle: Mapping[str, Any]) -> list[x509.Certificate]:
    chain = bundle["verificationMaterial"].get("x509CertificateChain")
    if not isinstance(chain, dict):
        return []
    try:
        return [
            x509.load_der_x509_certificate(base64.b64decode(c["rawBytes"], validate=True))
            for c in chain.get("certificates", [])
        ]
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BundleError(f"bad certificate in bundle: {exc}") from None


def verify_bundle(
    data: bytes | str | Mapping[str, Any], public_key: ec.EllipticCurvePublicKey
) -> VerifiedStatement:
    """Check the bundle's signature with ``public_key`` and return its parsed statement.

    Checks, in order: shape; key hint (when the bundle has one) equals the key's hint;
    payload type; ECDSA signature over the DSSE PAE; statement type, predicate type,
    one subject, resources well formed, and subject digest equal to their root digest.
    """
    try:
        bundle = parse_bundle(data)
    except BundleError as exc:
        raise VerificationError(str(exc)) from None
    hint = bundle_hint(bundle)
    if hint is not None and hint != key_hint(public_key):
        raise VerificationError("the bundle's key hint does not match the given public key")
    env = bundle["dsseEnvelope"]
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise VerificationError(f"DSSE payloadType must be {PAYLOAD_TYPE!r}")
    payload = _unb64(env.get("payload"), "payload")
    sig = _unb64(env["signatures"][0].get("sig"), "signature")
    try:
        public_key.verify(sig, pae(payload), ec.ECDSA(curve_hash(public_key)))
    except InvalidSignature:
        raise VerificationError("the signature does not verify with the given public key") from None
    return _parse_statement(payload, hint)


def unsafe_read_statement(data: bytes | str | Mapping[str, Any]) -> VerifiedStatement:
    """The bundle's statement, checked like :func:`verify_bundle` except that the signature
    is NOT checked: for describing a bundle (``modelsign bom``), never for trusting one."""
    try:
        bundle = parse_bundle(data)
    except BundleError as exc:
        raise VerificationError(str(exc)) from None
    env = bundle["dsseEnvelope"]
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise VerificationError(f"DSSE payloadType must be {PAYLOAD_TYPE!r}")
    return _parse_statement(_unb64(env.get("payload"), "payload"), bundle_hint(bundle))


def _parse_statement(payload: bytes, hint: str | None) -> VerifiedStatement:
    try:
        st = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise VerificationError(f"signed payload is not JSON: {exc}") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise VerificationError(f"signed payload is not an in-toto {STATEMENT_TYPE} statement")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise VerificationError(f"predicateType must be {PREDICATE_TYPE!r}")
    subjects = st.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise VerificationError("the statement must have exactly one subject")
    predicate = st.get("predicate")
    if not isinstance(predicate, dict):
        raise VerificationError("the statement has no predicate")
    ser = predicate.get("serialization")
    if (
        not isinstance(ser, dict)
        or ser.get("method") != "files"
        or ser.get("hash_type") != ALGORITHM
    ):
        raise VerificationError("only 'files' serialization with sha256 is supported")
    try:
        resources = validate_resources(predicate.get("resources"), max_resources=10_000_000)  # type: ignore[arg-type]
        ignore = [check_ignore_path(p) for p in ser.get("ignore_paths", [])]
    except ManifestError as exc:
        raise VerificationError(f"signed manifest is malformed: {exc}") from None
    subject = subjects[0]
    expected = subject.get("digest", {}).get("sha256") if isinstance(subject, dict) else None
    # Root digest over the resources in the order listed (the verifier does the same).
    listed = [Resource(r["name"], r["digest"]) for r in predicate["resources"]]
    actual = root_digest(listed)
    if expected != actual:
        raise VerificationError(
            f"manifest is inconsistent: subject digest {expected} but resources hash to {actual}"
        )
    return VerifiedStatement(
        statement=st,
        payload=payload,
        model_name=str(subject.get("name", "")),
        root_digest=actual,
        resources=resources,
        ignore_paths=ignore,
        hint=hint,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise VerificationError(f"DSSE {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"DSSE {what} is not valid base64") from None
