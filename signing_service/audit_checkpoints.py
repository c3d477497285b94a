"""Audit checkpoints: the audit log's head, signed now and then by a key the database cannot use.

Why: the hash chain (:mod:`signing_service.audit`) shows that the log is consistent with
itself, but whoever can write to the database can edit an entry and recompute every hash
after it, head row included, and the chain verifies again. A checkpoint is a signature by
the *checkpoint key* over "entry ``seq`` has hash ``entry_hash``". The key lives in an HSM
token of its own, so that rewrite would need the HSM too. Someone who holds only the
checkpoint public key can check that the log up to each checkpoint was not rewritten or
truncated since it was signed.

The checkpoint key is a :class:`~keys.models.SigningKey` of the reserved authority
:data:`~signing_service.policy.CHECKPOINT_AUTHORITY`. The policy loader refuses that name
for a signing authority, so no signing request can reach the key and it never signs a model.

Format. The payload is canonical JSON (sorted keys, no spaces)::

    {"type": "modelsign-audit-checkpoint", "number": 7, "seq": 1234,
     "entry_hash": "<hex SHA-256 of entry 1234>", "created_at": "<ISO 8601, UTC>",
     "key": "<hint of the checkpoint key>"}

It is wrapped in a DSSE envelope with payload type :data:`CHECKPOINT_PAYLOAD_TYPE`, shaped
like the trust document's: ``{"payloadType", "payload": base64, "signatures": [{"keyid":
hint, "sig": base64 DER ECDSA over the DSSE PAE}]}``. The key hint is the bundles' one
(SHA-256 of the public key PEM). The PAE covers the payload type, so a checkpoint signature
can never pass for a model bundle's signature.

Creating a checkpoint (:func:`create_checkpoint`) appends an ``audit.checkpoint`` entry and
signs the head *including that entry*, in one transaction. So a checkpoint covers its own
audit record, and an unchanged head means "nothing happened since the last checkpoint": no
new checkpoint is made.

What :func:`verify_checkpoints` guarantees, together with
:func:`signing_service.audit.verify_chain`:

* each checkpoint's signature verifies with a trusted checkpoint key (the key records in
  the database, or public keys held outside it, which is the meaningful check against
  someone who can write to the database);
* the entry at the signed ``seq`` exists, hashes to its contents and has the signed hash.
  Each entry's hash covers the previous one, so entries 1..seq are the ones that existed when
  the checkpoint was signed;
* checkpoint numbers run 1..n without gaps, their ``seq`` increase, and every
  ``audit.checkpoint`` entry of the log has its checkpoint.

Not covered: entries after the newest checkpoint, and removing the newest checkpoints
together with the log after them. Against that, keep copies of checkpoints outside the
database (``GET /api/v1/audit/checkpoints/``) and check them with ``verify_audit
--checkpoint-file``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from keys import registry
from keys.backends.base import KeyBackend, KeyBackendError
from keys.lifecycle import register_key, transition
from keys.models import KeyBackendName, KeyState, SigningKey
from signing_service import audit, bundle
from signing_service.models import AuditCheckpoint, AuditEntry, AuditHead
from signing_service.policy import CHECKPOINT_AUTHORITY, current_policy

CHECKPOINT_TYPE = "modelsign-audit-checkpoint"
CHECKPOINT_PAYLOAD_TYPE = "application/vnd.modelsign.audit-checkpoint.v1+json"
#: The audit action of a checkpoint's own entry (the entry the checkpoint signs).
CHECKPOINT_ACTION = "audit.checkpoint"
_PAYLOAD_FIELDS = frozenset({"type", "number", "seq", "entry_hash", "created_at", "key"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BATCH = 500


class CheckpointError(Exception):
    """Base error of this module; the message says what is wrong, for an operator."""


class CheckpointUnavailable(CheckpointError):
    """No checkpoint can be made now (no usable checkpoint key, backend down, bad setup)."""


class CheckpointInvalid(CheckpointError):
    """A checkpoint envelope is malformed or its signature does not verify."""


# --- the signed format (no database) ------------------------------------------------------


@dataclass(frozen=True)
class SignedHead:
    """What a checkpoint's signature covers."""

    number: int
    seq: int
    entry_hash: str
    created_at: str
    key: str

    def payload(self) -> bytes:
        body = {"type": CHECKPOINT_TYPE, **self.__dict__}
        return bundle.statement_payload(body)  # canonical JSON: sorted keys, no spaces


def make_envelope(head: SignedHead, signature_der: bytes) -> str:
    envelope = {
        "payloadType": CHECKPOINT_PAYLOAD_TYPE,
        "payload": base64.b64encode(head.payload()).decode("ascii"),
        "signatures": [{"keyid": head.key, "sig": base64.b64encode(signature_der).decode("ascii")}],
    }
    return json.dumps(envelope, indent=2) + "\n"


def trusted_keys(pems: Iterable[str | bytes]) -> dict[str, Any]:
    """Public keys by hint, as :func:`open_envelope` wants them; BundleError on a bad PEM."""
    keys = [bundle.load_public_key(pem) for pem in pems]
    return {bundle.key_hint(k): k for k in keys}


def open_envelope(
    text: str | bytes, trusted: Mapping[str, ec.EllipticCurvePublicKey]
) -> SignedHead:
    """The signed head, if the envelope is well formed and signed by a ``trusted`` key
    (by hint); :class:`CheckpointInvalid` naming the problem otherwise."""
    envelope = _json_object(text, "the envelope")
    if envelope.get("payloadType") != CHECKPOINT_PAYLOAD_TYPE:
        raise CheckpointInvalid(f"the envelope's payloadType is not {CHECKPOINT_PAYLOAD_TYPE!r}")
    payload = _unb64(envelope.get("payload"), "payload")
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise CheckpointInvalid("the envelope must carry exactly one signature")
    keyid = sigs[0].get("keyid")
    if not isinstance(keyid, str) or keyid not in trusted:
        raise CheckpointInvalid(
            f"it is signed by key {str(keyid)[:16]}, which is not a trusted checkpoint key"
        )
    signature = _unb64(sigs[0].get("sig"), "signature")
    public = trusted[keyid]
    try:
        signed = bundle.pae(payload, CHECKPOINT_PAYLOAD_TYPE)
        public.verify(signature, signed, ec.ECDSA(bundle.curve_hash(public)))
    except InvalidSignature:
        raise CheckpointInvalid(
            f"its signature does not verify with checkpoint key {keyid[:16]}"
        ) from None
    head = _parse_payload(payload)
    if head.key != keyid:
        raise CheckpointInvalid(f"its payload names key {head.key[:16]}, not its signer")
    return head


def _parse_payload(payload: bytes) -> SignedHead:
    body = _json_object(payload, "the signed payload")
    if body.get("type") != CHECKPOINT_TYPE or set(body) != _PAYLOAD_FIELDS:
        raise CheckpointInvalid(
            f"the signed payload is not a {CHECKPOINT_TYPE} with fields "
            f"{', '.join(sorted(_PAYLOAD_FIELDS))}"
        )
    for name in ("number", "seq"):
        value = body[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointInvalid(f"the signed {name} must be a positive whole number")
    if not isinstance(body["entry_hash"], str) or not _HEX64.fullmatch(body["entry_hash"]):
        raise CheckpointInvalid("the signed entry_hash must be 64 lowercase hex digits")
    for name in ("created_at", "key"):
        if not isinstance(body[name], str) or not body[name]:
            raise CheckpointInvalid(f"the signed {name} must be a non-empty string")
    return SignedHead(**{name: body[name] for name in _PAYLOAD_FIELDS - {"type"}})


def _json_object(data: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise CheckpointInvalid(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise CheckpointInvalid(f"{what} is not a JSON object")
    return value


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise CheckpointInvalid(f"the envelope's {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointInvalid(f"the envelope's {what} is not valid base64") from None


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


# --- the checkpoint key -------------------------------------------------------------------


def checkpoint_key() -> SigningKey:
    """The active checkpoint key; :class:`CheckpointUnavailable` if there is none."""
    key = SigningKey.objects.active_for(CHECKPOINT_AUTHORITY)
    if key is None:
        raise CheckpointUnavailable(
            "there is no active audit checkpoint key (none created, expired or revoked): "
            "create one with `manage.py audit_checkpoint --create-key`"
        )
    return key


def checkpoint_backend(token_label: str | None = None) -> KeyBackend:
    """The PKCS#11 backend of the checkpoint token, refused if a signing key shares it."""
    label = token_label or registry.pkcs11_token_label(CHECKPOINT_AUTHORITY)
    _check_token_of_its_own(label)
    return registry.pkcs11_backend(CHECKPOINT_AUTHORITY, label)


def _check_token_of_its_own(label: str) -> None:
    # Separate tokens keep the two PINs apart: whoever may sign models cannot sign checkpoints.
    for authority in current_policy().authorities.values():
        if authority.backend == "pkcs11" and registry.pkcs11_token_label(authority.name) == label:
            raise CheckpointUnavailable(
                f"AUDIT_CHECKPOINT_TOKEN {label!r} is also the token of signing authority "
                f"{authority.name!r}; the audit checkpoint key needs a token of its own"
            )
    shared = (
        SigningKey.objects.filter(backend=KeyBackendName.PKCS11, key_ref__token=label)
        .exclude(authority=CHECKPOINT_AUTHORITY)
        .first()
    )
    if shared is not None:
        raise CheckpointUnavailable(
            f"token {label!r} holds {shared.authority} key {shared.fingerprint}; the audit "
            "checkpoint key needs a token of its own"
        )


def create_key(
    actor: str, *, rotate: bool = False, transcript: dict[str, Any] | None = None
) -> SigningKey:
    """Generate the checkpoint key on its token and activate it (audited as ``key.activated``).

    With ``rotate``, the current checkpoint key moves to ``transition`` (it signs no more;
    its checkpoints stay verifiable) in the same transaction. Without it, an existing active
    checkpoint key is an error.
    """
    current = SigningKey.objects.filter(authority=CHECKPOINT_AUTHORITY, state=KeyState.ACTIVE)
    old = current.first()
    if old is not None and not rotate:
        raise CheckpointError(
            f"there is already an active audit checkpoint key ({old.fingerprint}); "
            "use --rotate to replace it"
        )
    backend = checkpoint_backend()
    algorithm = settings.AUDIT_CHECKPOINT_KEY_ALGORITHM
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    generated = backend.generate(
        f"{CHECKPOINT_AUTHORITY}-{stamp}-{secrets.token_hex(3)}", algorithm
    )
    with transaction.atomic():
        if old is not None:
            transition(old.pk, KeyState.TRANSITION, actor=actor, reason="checkpoint key rotated")
        return register_key(
            CHECKPOINT_AUTHORITY, backend, generated, algorithm=algorithm,
            validity=timedelta(days=settings.AUDIT_CHECKPOINT_KEY_DAYS), actor=actor,
            activate=True,
            transcript={
                "purpose": "audit checkpoints only", "token": generated.key_ref["token"],
                **(transcript or {}),
            },
        )  # fmt: skip


# --- making checkpoints -------------------------------------------------------------------


def create_checkpoint(actor: str) -> AuditCheckpoint | None:
    """Sign the audit log's head now; None if the head is already checkpointed.

    The checkpoint's own ``audit.checkpoint`` entry is appended first and is the entry that
    is signed, in the same transaction: if the key cannot sign, neither is stored.
    """
    key = checkpoint_key()
    backend = checkpoint_backend(key.key_ref.get("token"))
    with transaction.atomic():
        # Locked as by every append, so the head cannot move between reading and signing it,
        # and two checkpointers (beat plus a manual run) take turns instead of forking.
        head, _ = AuditHead.objects.select_for_update().get_or_create(pk=1)
        last = AuditCheckpoint.objects.select_related("key").order_by("-number").first()
        if last is not None:
            if last.seq == head.seq:
                return None
            _check_still_holds(last, head)
        number = last.number + 1 if last else 1
        entry = audit.record(
            actor, CHECKPOINT_ACTION,
            data={"number": number, "key": key.hint, "previous_seq": last.seq if last else None},
        )  # fmt: skip
        signed = SignedHead(
            number=number,
            seq=entry.seq,
            entry_hash=entry.entry_hash,
            created_at=_format_time(entry.created_at),
            key=key.hint,
        )
        envelope = make_envelope(signed, _sign(backend, key, signed.payload()))
        return AuditCheckpoint.objects.create(
            number=number, seq=entry.seq, entry_hash=entry.entry_hash,
            created_at=entry.created_at, key=key, envelope=envelope,
        )  # fmt: skip


def _check_still_holds(last: AuditCheckpoint, head: AuditHead) -> None:
    """Refuse to sign a head that contradicts the previous checkpoint: that would vouch for
    a log that was truncated or rewritten (``verify_audit`` says where)."""
    entry = AuditEntry.objects.filter(seq=last.seq).first()
    if head.seq < last.seq or entry is None or entry.entry_hash != last.entry_hash:
        raise CheckpointError(
            f"the audit log no longer matches checkpoint #{last.number} (entry {last.seq}); "
            "no new checkpoint is signed: run `manage.py verify_audit`"
        )


def _sign(backend: KeyBackend, key: SigningKey, payload: bytes) -> bytes:
    signed = bundle.pae(payload, CHECKPOINT_PAYLOAD_TYPE)
    try:
        der = backend.sign(key.key_ref, signed)
    except KeyBackendError as exc:
        raise CheckpointUnavailable(f"the audit checkpoint key could not sign: {exc}") from None
    public = bundle.load_public_key(key.public_key_pem)
    try:  # fail closed if the token signed with a key other than the one on record
        public.verify(der, signed, ec.ECDSA(bundle.curve_hash(public)))
    except InvalidSignature:
        raise CheckpointUnavailable(
            f"the checkpoint token returned a signature that does not verify with key "
            f"{key.fingerprint}"
        ) from None
    return der


# --- verifying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointProblem:
    number: int
    message: str


@dataclass(frozen=True)
class CheckpointReport:
    checked: int
    latest: AuditCheckpoint | None
    problems: list[CheckpointProblem]


def database_keys() -> dict[str, Any]:
    """Every checkpoint key on record (any state), by the hint of its stored public key.

    A record whose PEM does not load is left out: its checkpoints then fail as signed by an
    untrusted key, instead of the whole check crashing."""
    keys: dict[str, Any] = {}
    for pem in SigningKey.objects.filter(authority=CHECKPOINT_AUTHORITY).values_list(
        "public_key_pem", flat=True
    ):
        try:
            keys.update(trusted_keys([pem]))
        except bundle.BundleError:
            continue
    return keys


def verify_checkpoints(trusted: Mapping[str, Any] | None = None) -> CheckpointReport:
    """Check every stored checkpoint against the log; see the module doc for what it shows.

    ``trusted``: public keys by hint (:func:`trusted_keys`) held outside the database;
    default: the checkpoint keys on record, which someone who can write to the database could
    replace. Returns one problem per failing checkpoint number, all its reasons in it.
    """
    keys = dict(trusted) if trusted is not None else database_keys()
    revoked = _revocations()
    reasons: dict[int, list[str]] = {}
    seqs: dict[int, int] = {}
    expected, prev_seq, latest = 1, 0, None
    for cp, entry in _checkpoints_with_entries():
        for missing in range(expected, cp.number):
            reasons.setdefault(missing, []).append(f"it is missing (the next is #{cp.number})")
        if cp.seq <= prev_seq:
            reasons.setdefault(cp.number, []).append("it signs an entry before the previous one's")
        found = _check(cp, entry, keys, revoked)
        if found:
            reasons.setdefault(cp.number, []).extend(found)
        seqs[cp.number] = cp.seq
        expected, prev_seq, latest = cp.number + 1, cp.seq, cp
    for number, reason in _unmatched_audit_records(seqs):
        reasons.setdefault(number, []).append(reason)
    problems = [CheckpointProblem(n, "; ".join(r)) for n, r in sorted(reasons.items())]
    return CheckpointReport(len(seqs), latest, problems)


def verify_envelope(text: str | bytes, trusted: Mapping[str, Any] | None = None) -> SignedHead:
    """Check a checkpoint kept outside the database against the log and the stored copy.

    Returns the signed head; :class:`CheckpointInvalid` says what does not match.
    """
    keys = dict(trusted) if trusted is not None else database_keys()
    head = open_envelope(text, keys)
    entry = AuditEntry.objects.filter(seq=head.seq).first()
    reasons = _chain_reasons(head, entry)
    stored = AuditCheckpoint.objects.filter(number=head.number).first()
    if stored is None:
        reasons.append(f"the database has no checkpoint #{head.number} (it was removed)")
    elif (stored.seq, stored.entry_hash) != (head.seq, head.entry_hash):
        reasons.append(f"the stored checkpoint #{head.number} differs from this copy")
    if reasons:
        raise CheckpointInvalid("; ".join(reasons))
    return head


def _checkpoints_with_entries() -> Iterator[tuple[AuditCheckpoint, AuditEntry | None]]:
    last = 0
    while True:
        batch = list(
            AuditCheckpoint.objects.filter(number__gt=last)
            .select_related("key")
            .order_by("number")[:_BATCH]
        )
        if not batch:
            return
        # The signed seq, not the column, is what counts; they differ only if tampered with,
        # and then _check reports it (and the signed entry is looked up on its own).
        entries = AuditEntry.objects.filter(seq__in=[cp.seq for cp in batch])
        by_seq = {e.seq: e for e in entries}
        for cp in batch:
            yield cp, by_seq.get(cp.seq)
        last = batch[-1].number


def _check(
    cp: AuditCheckpoint,
    entry: AuditEntry | None,
    keys: Mapping[str, Any],
    revoked: Mapping[str, datetime],
) -> list[str]:
    try:
        head = open_envelope(cp.envelope, keys)
    except CheckpointInvalid as exc:
        return [str(exc)]
    reasons: list[str] = []
    if (head.number, head.seq, head.entry_hash, head.key) != (
        cp.number,
        cp.seq,
        cp.entry_hash,
        cp.key.hint,
    ):
        reasons.append("its stored number, entry, hash or key differ from what was signed")
        entry = AuditEntry.objects.filter(seq=head.seq).first()
    reasons += _chain_reasons(head, entry)
    effective = revoked.get(head.key)
    if effective is not None and _signed_at(head) >= effective:
        reasons.append(
            f"it was signed at {head.created_at}, at or after its key's revocation "
            f"(effective {_format_time(effective)})"
        )
    return reasons


def _chain_reasons(head: SignedHead, entry: AuditEntry | None) -> list[str]:
    if entry is None:
        return [f"entry {head.seq}, which it signs, is missing: the log was truncated or cut"]
    if audit.recompute_hash(entry) != entry.entry_hash:
        return [f"entry {head.seq} was modified after it was signed"]
    if entry.entry_hash != head.entry_hash:
        return [
            f"entry {head.seq} has hash {entry.entry_hash[:16]}, but {head.entry_hash[:16]} was "
            f"signed: the log up to entry {head.seq} was rewritten"
        ]
    return []


def _signed_at(head: SignedHead) -> datetime:
    try:
        value = datetime.fromisoformat(head.created_at)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)  # unreadable: treat as after any revocation
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _revocations() -> dict[str, datetime]:
    rows = SigningKey.objects.filter(
        authority=CHECKPOINT_AUTHORITY, state=KeyState.REVOKED
    ).values_list("hint", "revocation_effective_at", "revoked_at")
    return {hint: effective or revoked_at or timezone.now() for hint, effective, revoked_at in rows}


def _unmatched_audit_records(seqs: Mapping[int, int]) -> Iterator[tuple[int, str]]:
    """Every ``audit.checkpoint`` entry must have its checkpoint: removing checkpoint rows
    (to hide a rewrite they would reveal) then shows, unless the log is cut there too."""
    records = AuditEntry.objects.filter(action=CHECKPOINT_ACTION).values_list("seq", "data")
    for seq, data in records.iterator():
        number = data.get("number") if isinstance(data, dict) else None
        if not isinstance(number, int) or seqs.get(number) == seq:
            continue
        if number not in seqs:
            yield number, f"the log records it at entry {seq}, but it is not in the database"
        else:
            yield number, f"the log records it at entry {seq}, but it signs entry {seqs[number]}"
