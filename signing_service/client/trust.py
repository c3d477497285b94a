"""Trust documents for offline verifiers: parse, check signatures, decide if a key is accepted.

The service publishes one JSON document (``GET /api/v1/trust/``) listing every non-pending
key with its state and windows, wrapped in a DSSE envelope signed by each active key. This
module is the client half and imports nothing from Django; the server builds documents with
:mod:`signing_service.trust` using the constants defined here, so both ends agree.

Trust model:

* a document is *self-consistent* when at least one signature verifies with a key the
  document itself lists as ``active``. That proves integrity, not origin: anyone can make a
  self-consistent document with their own key;
* origin is established once, when the document is fetched (:func:`trusted_signers`): one of
  those signers must be a key the caller already trusts (a pinned public key, or a key that
  was active or in its transition window in the previously fetched document);
* a verifier then only needs :func:`load_verified` and :func:`check_key` offline.

Every failure is a :class:`TrustError` with a one-line message for people.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from signing_service.client.api import ServiceClient

__all__ = [
    "TRUST_PATH",
    "TRUST_PAYLOAD_TYPE",
    "TRUST_TYPE",
    "TrustDocument",
    "TrustError",
    "TrustKey",
    "check_key",
    "check_not_older",
    "fetch",
    "format_time",
    "load_verified",
    "parse",
    "parse_time",
    "pinned_hints",
    "previous_anchors",
    "signers",
    "trusted_signers",
]

TRUST_TYPE = "modelsign-trust"
TRUST_PAYLOAD_TYPE = "application/vnd.modelsign.trust.v1+json"
TRUST_PATH = "api/v1/trust/"
#: A bundle may claim a signing time this far after the verification time (clock skew).
CLOCK_SKEW = timedelta(minutes=5)
_KEY_FIELDS = ("authority", "hint", "algorithm", "public_key_pem", "state")


class TrustError(ValueError):
    """The trust document, or a key's standing in it, does not allow what was asked."""


# --- times -----------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """ISO 8601 to an aware datetime; a time without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise TrustError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def format_time(value: datetime | None) -> str | None:
    """The one time format of the document: ISO 8601 in UTC (microseconds kept, they matter
    when a revocation time and a signing time are close)."""
    return None if value is None else value.astimezone(UTC).isoformat()


def _optional_time(entry: Mapping[str, Any], name: str, where: str) -> datetime | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TrustError(f"{where}.{name} must be a time string or null")
    try:
        return parse_time(value)
    except TrustError:
        raise TrustError(f"{where}.{name} is not an ISO 8601 time: {value!r}") from None


# --- the document ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrustKey:
    authority: str
    hint: str
    algorithm: str
    public_key: ec.EllipticCurvePublicKey
    state: str
    not_before: datetime | None
    not_after: datetime | None
    transition_until: datetime | None
    revoked_at: datetime | None
    revocation_effective_at: datetime | None
    revocation_reason: str

    @property
    def name(self) -> str:
        """How keys are named in messages: authority and a hint prefix people can compare."""
        return f"{self.authority} key {self.hint[:16]}"


@dataclass(frozen=True)
class TrustDocument:
    version: int
    issued_at: datetime
    keys: Mapping[str, TrustKey]  # by hint
    authorities: Mapping[str, Any]
    verification_policy: Mapping[str, Any]
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, DER signature)


def parse(data: bytes) -> TrustDocument:
    """Parse an envelope and its document without checking any signature."""
    envelope = _json_object(data, "the trust file")
    if envelope.get("payloadType") != TRUST_PAYLOAD_TYPE:
        raise TrustError(f"the trust file's payloadType must be {TRUST_PAYLOAD_TYPE!r}")
    payload = _unb64(envelope.get("payload"), "payload")
    doc = _json_object(payload, "the trust document")
    if doc.get("type") != TRUST_TYPE:
        raise TrustError(f"the trust document's type must be {TRUST_TYPE!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TrustError("the trust document's version must be a positive whole number")
    issued_at = _optional_time(doc, "issued_at", "document")
    if issued_at is None:
        raise TrustError("the trust document has no issued_at")
    return TrustDocument(
        version=version,
        issued_at=issued_at,
        keys=_keys(doc.get("keys")),
        authorities=_mapping(doc.get("authorities"), "authorities"),
        verification_policy=_mapping(doc.get("verification_policy"), "verification_policy"),
        payload=payload,
        signatures=_signatures(envelope.get("signatures")),
    )


def _keys(value: object) -> dict[str, TrustKey]:
    if not isinstance(value, list):
        raise TrustError("the trust document's keys must be a list")
    keys: dict[str, TrustKey] = {}
    for i, entry in enumerate(value):
        key = _key(entry, f"keys[{i}]")
        if key.hint in keys:
            raise TrustError(f"keys[{i}]: hint {key.hint} is listed twice")
        keys[key.hint] = key
    return keys


def _key(entry: object, where: str) -> TrustKey:
    from signing_service import bundle

    if not isinstance(entry, dict):
        raise TrustError(f"{where} must be an object")
    for name in _KEY_FIELDS:
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise TrustError(f"{where}.{name} must be a non-empty string")
    try:
        public_key = bundle.load_public_key(entry["public_key_pem"])
    except bundle.BundleError as exc:
        raise TrustError(f"{where}.public_key_pem: {exc}") from None
    # The hint is how bundles name their key: it must be the hash of this very key.
    if bundle.key_hint(public_key) != entry["hint"]:
        raise TrustError(f"{where}: hint {entry['hint'][:16]} does not match its public key")
    reason = entry.get("revocation_reason")
    return TrustKey(
        authority=entry["authority"],
        hint=entry["hint"],
        algorithm=entry["algorithm"],
        public_key=public_key,
        state=entry["state"],
        not_before=_optional_time(entry, "not_before", where),
        not_after=_optional_time(entry, "not_after", where),
        transition_until=_optional_time(entry, "transition_until", where),
        revoked_at=_optional_time(entry, "revoked_at", where),
        revocation_effective_at=_optional_time(entry, "revocation_effective_at", where),
        revocation_reason=reason if isinstance(reason, str) else "",
    )


def _signatures(value: object) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(value, list):
        raise TrustError("the trust file's signatures must be a list")
    out: list[tuple[str, bytes]] = []
    for i, sig in enumerate(value):
        if not isinstance(sig, dict) or not isinstance(sig.get("keyid"), str):
            raise TrustError(f"signatures[{i}] must be an object with a keyid")
        out.append((sig["keyid"], _unb64(sig.get("sig"), f"signatures[{i}].sig")))
    return tuple(out)


# --- signatures ------------------------------------------------------------------------


def signers(doc: TrustDocument) -> list[TrustKey]:
    """The keys the document lists as active whose signature on it verifies.

    Signatures by keys in any other state, or by keys it does not list, count for nothing.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    from signing_service import bundle

    signed = bundle.pae(doc.payload, TRUST_PAYLOAD_TYPE)
    found: dict[str, TrustKey] = {}
    for keyid, sig in doc.signatures:
        key = doc.keys.get(keyid)
        if key is None or key.state != "active" or keyid in found:
            continue
        try:
            key.public_key.verify(sig, signed, ec.ECDSA(bundle.curve_hash(key.public_key)))
        except InvalidSignature:
            continue
        found[keyid] = key
    return list(found.values())


def load_verified(data: bytes, what: str = "the trust file") -> TrustDocument:
    """Parse a trust file and require it to be self-consistent (see the module doc)."""
    doc = parse(data)
    if not signers(doc):
        raise TrustError(f"{what} is not validly signed by any key it lists as active")
    return doc


def pinned_hints(pems: Iterable[bytes]) -> set[str]:
    from signing_service import bundle

    try:
        return {bundle.key_hint(bundle.load_public_key(pem)) for pem in pems}
    except bundle.BundleError as exc:
        raise TrustError(f"pinned key: {exc}") from None


def previous_anchors(previous: TrustDocument, now: datetime) -> set[str]:
    """Keys a previous document vouched for: active, or in transition and still inside its
    window (a key whose window is over is no longer trusted for anything)."""
    return {
        k.hint
        for k in previous.keys.values()
        if k.state == "active"
        or (k.state == "transition" and k.transition_until is not None and now < k.transition_until)
    }


def check_not_older(previous: TrustDocument, doc: TrustDocument) -> None:
    """Refuse a rollback: an old, validly signed document could still list a key that has
    since been revoked."""
    if doc.version < previous.version:
        raise TrustError(
            f"the server sent trust document version {doc.version}, older than the "
            f"previous version {previous.version}; refusing a rollback"
        )
    if doc.version == previous.version and doc.payload != previous.payload:
        raise TrustError(f"trust document version {doc.version} differs from the previous copy")


def trusted_signers(doc: TrustDocument, anchors: set[str]) -> list[TrustKey]:
    """The document's valid signers the caller already trusts; TrustError if there are none."""
    valid = signers(doc)
    trusted = [k for k in valid if k.hint in anchors]
    if not trusted:
        names = ", ".join(k.name for k in valid) or "no valid signature"
        raise TrustError(
            f"the trust document is not signed by any key you trust (signed by: {names})"
        )
    return trusted


def fetch(client: ServiceClient) -> bytes:
    """The envelope exactly as the server sent it, so it can be re-verified offline."""
    # ServiceClient has no public raw-bytes GET for JSON; _request is the transport that
    # keeps its same-origin, no-redirect and retry guarantees.
    return client._request("GET", client.url(TRUST_PATH))


# --- key standing ----------------------------------------------------------------------


def check_key(doc: TrustDocument, hint: str, signed_at: datetime, now: datetime) -> TrustKey:
    """The key with ``hint`` if a signature it made at ``signed_at`` is accepted at ``now``.

    Active keys: ``signed_at`` inside not_before..not_after. Transition keys: the same, and
    ``now`` before transition_until. Revoked keys: the same, and ``signed_at`` before the
    revocation's effective time. Retired, pending and unknown keys: never.
    """
    key = doc.keys.get(hint)
    if key is None:
        raise TrustError(f"the signing key {hint[:16]} is not in the trust document")
    if signed_at > now + CLOCK_SKEW:
        raise TrustError(
            f"the bundle claims it was signed at {format_time(signed_at)}, "
            f"after the verification time {format_time(now)}"
        )
    if key.state == "retired":
        raise TrustError(f"{key.name} is retired; its signatures are no longer accepted")
    if key.state == "revoked":
        _check_revoked(key, signed_at)
    elif key.state == "transition":
        _check_transition(key, now)
    elif key.state != "active":
        raise TrustError(f"{key.name} is {key.state}; its signatures are not accepted")
    _check_window(key, signed_at)
    return key


def _check_revoked(key: TrustKey, signed_at: datetime) -> None:
    effective = key.revocation_effective_at
    reason = f" ({key.revocation_reason})" if key.revocation_reason else ""
    if effective is None or signed_at >= effective:
        raise TrustError(
            f"{key.name} was revoked{reason} effective {format_time(effective) or 'always'}; "
            f"the signature was made at {format_time(signed_at)}, at or after that"
        )


def _check_transition(key: TrustKey, now: datetime) -> None:
    until = key.transition_until
    if until is None:  # fail closed: a window we cannot see is not open
        raise TrustError(f"{key.name} is in transition with no end of window; not accepted")
    if now >= until:
        raise TrustError(
            f"{key.name} is in transition and its window ended at {format_time(until)}"
        )


def _check_window(key: TrustKey, signed_at: datetime) -> None:
    early = key.not_before is not None and signed_at < key.not_before
    late = key.not_after is not None and signed_at >= key.not_after
    if early or late:
        raise TrustError(
            f"the signature time {format_time(signed_at)} is outside {key.name}'s validity "
            f"window {format_time(key.not_before)} .. {format_time(key.not_after) or 'open'}"
        )


# --- small helpers ---------------------------------------------------------------------


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise TrustError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise TrustError(f"{what} is not a JSON object")
    return value


def _mapping(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TrustError(f"the trust document's {name} must be an object")
    return value


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise TrustError(f"the trust file's {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise TrustError(f"the trust file's {what} is not valid base64") from None
