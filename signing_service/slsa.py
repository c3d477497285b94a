"""SLSA provenance v1 statements that travel with a signing request, and their bundles.

A CI job may send, with the model's manifest, the in-toto Statement v1 its builder wrote
(predicate type ``https://slsa.dev/provenance/v1``) for the model. The service signs it as a
second bundle with the same key; the model's own statement names its digest. This module is
the format; it imports nothing from Django, so the `modelsign` client and the deployment gate
use it offline.

Guarantees:

* :func:`parse_statement` accepts only a statement with the in-toto and SLSA types, exactly
  one subject with a lowercase hex ``sha256`` digest, a ``buildDefinition`` with a
  ``buildType`` and ``externalParameters``, and a ``runDetails.builder.id``; every refusal is
  a :class:`ProvenanceError` whose message names the field;
* the payload it returns is the canonical JSON of the statement (the same encoding as the
  model's statement), so its SHA-256 is stable and is what the model's signature names;
* :func:`verify_bundle` fails closed: any shape, hint, payload type, signature or statement
  problem raises :class:`ProvenanceError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from signing_service import bundle

SLSA_PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
#: Default cap on a statement's canonical JSON; the service's is ``MAX_PROVENANCE_BYTES``.
DEFAULT_MAX_BYTES = 256 * 1024
#: Longest builder id, build type or source URI shown to approvers and stored.
MAX_TEXT = 2048
MAX_COMMIT = 128
_STATEMENT_FIELDS = frozenset({"_type", "subject", "predicateType", "predicate"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ProvenanceError(bundle.BundleError):
    """The provenance (statement or bundle) is not acceptable; the message names the field."""


@dataclass(frozen=True)
class Provenance:
    """A checked SLSA v1 statement: its canonical bytes, their digest, what approvers see."""

    statement: dict[str, Any]
    payload: bytes
    #: SHA-256 of :attr:`payload`: the provenance bundle's payload digest.
    digest: str
    subject_name: str
    subject_digest: str
    builder_id: str
    build_type: str
    source_uri: str
    source_commit: str


@dataclass(frozen=True)
class VerifiedProvenance:
    """What a provenance bundle whose signature checked out says."""

    provenance: Provenance
    #: SHA-256 of the signed payload bytes, exactly as they are in the bundle.
    payload_digest: str
    hint: str | None


def canonical_payload(statement: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed and signed (sorted keys, no spaces, UTF-8)."""
    return bundle.statement_payload(statement)


def parse_statement(value: object, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Provenance:
    """Check a provenance statement (parsed JSON) and summarise it; see the module docs."""
    if not isinstance(value, dict):
        raise ProvenanceError(f"must be an in-toto statement (a JSON object), got {_kind(value)}")
    unknown = sorted(set(value) - _STATEMENT_FIELDS, key=str)
    if unknown:
        raise ProvenanceError(f"{unknown[0]}: is not a field of an in-toto Statement v1")
    try:
        payload = canonical_payload(value)
    except (ValueError, TypeError) as exc:  # NaN or Infinity (e.g. 1e400), not JSON data
        raise ProvenanceError(f"is not plain JSON: {exc}") from None
    if len(payload) > max_bytes:
        raise ProvenanceError(
            f"is {len(payload)} bytes as canonical JSON; the limit is {max_bytes}"
        )
    if value.get("_type") != bundle.STATEMENT_TYPE:
        raise ProvenanceError(
            f"_type must be {bundle.STATEMENT_TYPE!r}, got {_shown(value.get('_type'))}"
        )
    if value.get("predicateType") != SLSA_PREDICATE_TYPE:
        raise ProvenanceError(
            f"predicateType must be {SLSA_PREDICATE_TYPE!r} (SLSA provenance v1), "
            f"got {_shown(value.get('predicateType'))}"
        )
    name, digest = _subject(value.get("subject"))
    predicate = _object(value.get("predicate"), "predicate")
    definition = _object(predicate.get("buildDefinition"), "predicate.buildDefinition")
    build_type = _text(definition.get("buildType"), "predicate.buildDefinition.buildType")
    _object(definition.get("externalParameters"), "predicate.buildDefinition.externalParameters")
    run = _object(predicate.get("runDetails"), "predicate.runDetails")
    builder = _object(run.get("builder"), "predicate.runDetails.builder")
    builder_id = _text(builder.get("id"), "predicate.runDetails.builder.id")
    source_uri, commit = _source(definition)
    return Provenance(
        statement=json.loads(payload),
        payload=payload,
        digest=hashlib.sha256(payload).hexdigest(),
        subject_name=name,
        subject_digest=digest,
        builder_id=builder_id,
        build_type=build_type,
        source_uri=source_uri,
        source_commit=commit,
    )


def verify_bundle(
    data: bytes | str | Mapping[str, Any],
    public_key: ec.EllipticCurvePublicKey,
    *,
    max_bytes: int = 16 * 1024 * 1024,
) -> VerifiedProvenance:
    """Check a provenance bundle's signature with ``public_key``; return what it says."""
    try:
        parsed = bundle.parse_bundle(data)
    except bundle.BundleError as exc:
        raise ProvenanceError(str(exc)) from None
    hint = bundle.bundle_hint(parsed)
    if hint is not None and hint != bundle.key_hint(public_key):
        raise ProvenanceError("the bundle's key hint does not match the given public key")
    envelope = parsed["dsseEnvelope"]
    if envelope.get("payloadType") != bundle.PAYLOAD_TYPE:
        raise ProvenanceError(f"DSSE payloadType must be {bundle.PAYLOAD_TYPE!r}")
    payload = _unb64(envelope.get("payload"), "payload")
    signature = _unb64(envelope["signatures"][0].get("sig"), "signature")
    try:
        public_key.verify(signature, bundle.pae(payload), ec.ECDSA(bundle.curve_hash(public_key)))
    except InvalidSignature:
        raise ProvenanceError("the signature does not verify with the given public key") from None
    try:
        statement = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ProvenanceError(f"the signed payload is not JSON: {exc}") from None
    return VerifiedProvenance(
        provenance=parse_statement(statement, max_bytes=max_bytes),
        payload_digest=hashlib.sha256(payload).hexdigest(),
        hint=hint,
    )


# --- parts -----------------------------------------------------------------------------


def _subject(value: object) -> tuple[str, str]:
    if not isinstance(value, list) or len(value) != 1:
        count = len(value) if isinstance(value, list) else _kind(value)
        raise ProvenanceError(f"subject must list exactly one subject (the model), got {count}")
    subject = _object(value[0], "subject[0]")
    digests = _object(subject.get("digest"), "subject[0].digest")
    digest = digests.get("sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ProvenanceError(
            f"subject[0].digest.sha256 must be 64 lowercase hex characters, got {_shown(digest)}"
        )
    name = subject.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_TEXT or _bad_character(name):
        raise ProvenanceError("subject[0].name must be printable text")
    return name, digest


def _source(definition: Mapping[str, Any]) -> tuple[str, str]:
    """Source repository and commit, for approvers: the first resolved dependency pinned to a
    git commit, else the repository the external parameters name (GitHub: ``workflow``)."""
    deps = definition.get("resolvedDependencies")
    for i, dep in enumerate(deps if isinstance(deps, list) else []):
        digest = dep.get("digest") if isinstance(dep, dict) else None
        commit = (
            (digest.get("gitCommit") or digest.get("sha1")) if isinstance(digest, dict) else None
        )
        if isinstance(commit, str) and commit and isinstance(dep.get("uri"), str) and dep["uri"]:
            where = f"predicate.buildDefinition.resolvedDependencies[{i}]"
            return _text(dep["uri"], f"{where}.uri"), _text(commit, f"{where}.digest", MAX_COMMIT)
    params = definition.get("externalParameters")
    for key in ("workflow", "source"):
        value = params.get(key) if isinstance(params, dict) else None
        uri = (value.get("repository") or value.get("uri")) if isinstance(value, dict) else value
        if isinstance(uri, str) and uri:
            return _text(uri, f"predicate.buildDefinition.externalParameters.{key}"), ""
    return "", ""


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProvenanceError(f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _text(value: object, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProvenanceError(f"{where} must be a non-empty string, got {_shown(value)}")
    if len(value) > limit:
        raise ProvenanceError(f"{where} is longer than {limit} characters")
    if (problem := _bad_character(value)) is not None:
        raise ProvenanceError(f"{where} {problem}")
    return value


def _bad_character(text: str) -> str | None:
    # Shown to approvers: nothing that displays as something it is not (bidi, controls).
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            return f"contains a control or formatting character U+{ord(ch):04X}"
    return None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProvenanceError(f"DSSE {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProvenanceError(f"DSSE {what} is not valid base64") from None
