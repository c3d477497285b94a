"""Re-signing (SPEC section 9): an old key's signatures superseded by the active key's.

Rotation re-signs every ``valid`` signature of a key in ``transition`` (or ``retired``);
revocation re-signs every ``quarantined`` signature of a ``revoked`` key. All rules live here;
views and tasks only call :func:`plan_for_authority`, :func:`decide`, :func:`resign_many`,
:func:`resign_one`, :func:`finish_if_done` and :func:`dispatch`.

Guarantees:

* Planning is idempotent: one :class:`~keys.models.ResignBatch` per (old key, new key)
  (unique constraint), its signatures marked with one UPDATE in the transaction that creates
  it; planning again finds nothing new unless something really is new (a second revocation,
  a newer active key). Planning never needs the broker.
* A batch for an authority that requires approval waits for that many distinct approvers,
  each with a fresh second factor; one rejection rejects it.
* :func:`resign_many` (a chunk) and :func:`resign_one` may run twice, concurrently, or be
  killed at any point: the old signatures move to ``superseded`` with a conditional UPDATE in
  the same transaction that creates the new signatures (unique (request, key), one-to-one
  ``supersedes``) and their audit records, so a signature is re-signed at most once and never
  lost. Every try is counted before the key is used; a signature tried before is retried on
  its own, so one that fails (or kills its worker) every time uses up only its own attempts.
* Only the batch's new key signs, and only while it is the authority's active key; a
  backend outage makes the item wait, never fall back to another key.
* Only signatures in this database made by a service-held key are touched; keyless
  signatures have no key and are never re-signed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mass_mail
from django.db import IntegrityError, OperationalError, transaction
from django.db.models import F, QuerySet
from django.urls import reverse
from django.utils import timezone

from approvals.groups import approver_authorities, approver_group, identity_of
from approvals.services import approvals_for_statements, check_fresh_otp
from keys.backends.base import BackendUnavailable, KeyBackend, KeyBackendError
from keys.models import Incident, KeyState, ResignBatch, ResignDecision, SigningKey
from keys.registry import backend_for
from provenance.models import ProvenanceRecord, mark_without_provenance
from signing_service import audit, bundle, rows
from signing_service.models import Signature, SignatureState, SigningRequest
from signing_service.policy import Authority, current_policy
from signing_service.signing import (
    SigningRefused,
    _bundle_json,
    _check_signature,
    _ensure_usable,
    _signed_statement,
    bound_statement,
)

log = logging.getLogger(__name__)

ACTOR = "signing-service"
#: Tries per signature (each counted before the key is used) before it is given up on.
MAX_ATTEMPTS = 5
#: Signatures claimed, signed and stored together (one transaction) by :func:`resign_many`.
CHUNK = 500
#: Distinct (model, version) pairs kept on a batch for its approvers.
MODELS_SUMMARY_CAP = 100
OPEN_STATES = (ResignBatch.State.PENDING_APPROVAL, ResignBatch.State.RUNNING)

Reason = ResignBatch.Reason
BatchState = ResignBatch.State


# --- which signatures ------------------------------------------------------------------


def expected_states(batch: ResignBatch) -> tuple[str, ...]:
    """The states in which a batch's signatures still need re-signing.

    A rotation batch also takes quarantined ones: its old key was revoked after planning,
    and those are the same signatures, still to be re-signed with the same new key.
    """
    if batch.reason == Reason.REVOCATION:
        return (SignatureState.QUARANTINED,)
    return (SignatureState.VALID, SignatureState.QUARANTINED)


def remaining(batch: ResignBatch) -> QuerySet[Signature]:
    """The batch's signatures still to re-sign (not yet given up on)."""
    return Signature.objects.filter(
        resign_batch=batch, state__in=expected_states(batch), resign_attempts__lt=MAX_ATTEMPTS
    )


def _needing(old: SigningKey, new: SigningKey, reason: str) -> QuerySet[Signature]:
    """Signatures of ``old`` that need a new key and no batch for ``new`` covers yet."""
    state = SignatureState.QUARANTINED if reason == Reason.REVOCATION else SignatureState.VALID
    # The covering batches' ids, not a join: with a join the UPDATE that plans a batch
    # becomes "WHERE id IN (SELECT ...)", a second pass over the old key's signatures.
    covered = list(ResignBatch.objects.filter(new_key=new).values_list("pk", flat=True))
    return Signature.objects.filter(key=old, state=state).exclude(resign_batch__in=covered)


def resigned_count(batch: ResignBatch) -> int:
    return Signature.objects.filter(supersedes__resign_batch=batch, key=batch.new_key).count()


# --- planning --------------------------------------------------------------------------


def plan_for_authority(authority: str) -> list[ResignBatch]:
    """Plan a re-sign batch for every older key of ``authority`` whose signatures need one.

    Needs an active key. Returns the batches created by this call (an empty list when
    there is nothing new). Batches of earlier active keys that never finished are closed;
    their remaining signatures move to the new batch.
    """
    policy_authority = current_policy().authority(authority)
    if policy_authority is None or policy_authority.type != "key-based":
        return []
    new_key = SigningKey.objects.active_for(authority)
    if new_key is None:
        return []
    planned = []
    older = SigningKey.objects.filter(
        authority=authority, state__in=(KeyState.TRANSITION, KeyState.RETIRED, KeyState.REVOKED)
    ).exclude(pk=new_key.pk)
    for old in older.order_by("created_at"):
        if old.state == KeyState.REVOKED:
            _link_incident(old, new_key)
        batch = _plan_key(old, new_key, policy_authority)
        if batch is not None:
            planned.append(batch)
    _close_obsolete(authority, new_key)
    return planned


def _plan_key(old: SigningKey, new: SigningKey, authority: Authority) -> ResignBatch | None:
    reason = Reason.REVOCATION if old.state == KeyState.REVOKED else Reason.ROTATION
    needing = _needing(old, new, reason)
    if not needing.exists():
        return None
    if ResignBatch.objects.filter(old_key=old, new_key=new).exists():
        # Its signatures were all marked when it was planned; this can only be a race.
        log.warning("re-sign batch %s -> %s exists; not planning again", old, new)
        return None
    try:
        with transaction.atomic():
            batch = _create_batch(old, new, authority, reason, needing)
    except IntegrityError:
        return None  # a concurrent planner created the same (old key, new key) batch
    except _NothingToPlan:
        return None
    transaction.on_commit(lambda: _after_planning(batch.pk), robust=True)
    return batch


class _NothingToPlan(Exception):
    """Rolls back a batch whose signatures were taken between the check and the UPDATE."""


def _create_batch(
    old: SigningKey,
    new: SigningKey,
    authority: Authority,
    reason: str,
    needing: QuerySet[Signature],
) -> ResignBatch:
    required = authority.approval_count if authority.requires_approval else 0
    incident = (
        Incident.objects.filter(key=old).order_by("-opened_at").first()
        if reason == Reason.REVOCATION
        else None
    )
    batch = ResignBatch.objects.create(
        authority=authority.name,
        reason=reason,
        old_key=old,
        new_key=new,
        incident=incident,
        state=BatchState.PENDING_APPROVAL if required else BatchState.RUNNING,
        required_approvals=required,
    )
    # One UPDATE marks them all; a fresh attempt count for signatures given up on earlier.
    batch.total = needing.update(resign_batch=batch, resign_attempts=0)
    if not batch.total:
        raise _NothingToPlan
    batch.models_summary = _models_summary(batch)
    batch.save(update_fields=["total", "models_summary"])
    audit.record(
        ACTOR,
        "resign_batch.planned",
        target=batch,
        data={"authority": batch.authority, "reason": reason, "old_key": old.hint,
              "new_key": new.hint, "total": batch.total, "state": batch.state,
              "required_approvals": required,
              "incident": str(incident.pk) if incident else None},
    )  # fmt: skip
    return batch


def _models_summary(batch: ResignBatch) -> list[dict[str, str]]:
    rows = (
        Signature.objects.filter(resign_batch=batch)
        .values_list("request__model_name", "request__model_version")
        .order_by("request__model_name", "request__model_version")
        .distinct()[:MODELS_SUMMARY_CAP]
    )
    return [{"model": model, "version": version} for model, version in rows]


def _link_incident(old: SigningKey, new: SigningKey) -> None:
    """A rotation batch of a key revoked later belongs to the revocation's incident too."""
    incident = Incident.objects.filter(key=old).order_by("-opened_at").first()
    if incident is None:
        return
    with transaction.atomic():
        linked = list(
            ResignBatch.objects.select_for_update().filter(
                old_key=old, new_key=new, incident__isnull=True
            )
        )
        if not linked:
            return
        for batch in linked:
            batch.incident = incident
            batch.save(update_fields=["incident"])
            audit.record(
                ACTOR, "resign_batch.incident_linked", target=batch,
                data={"incident": str(incident.pk)},
            )  # fmt: skip
        _resolve_incident_if_done(incident.pk)


def _close_obsolete(authority: str, new_key: SigningKey) -> None:
    """Batches for an earlier active key can never run; close them (their signatures were
    moved to a batch for the current key above)."""
    stale = ResignBatch.objects.filter(authority=authority, state__in=OPEN_STATES).exclude(
        new_key=new_key
    )
    for pk in stale.values_list("pk", flat=True):
        with transaction.atomic():
            batch = ResignBatch.objects.select_for_update().get(pk=pk)
            if batch.state not in OPEN_STATES:
                continue
            _complete(batch, note=f"its new key {batch.new_key.fingerprint} is no longer active")


def _after_planning(batch_id: Any) -> None:
    batch = ResignBatch.objects.select_related("old_key", "new_key").get(pk=batch_id)
    if batch.state == BatchState.PENDING_APPROVAL:
        notify_approvers(batch)
    elif batch.state == BatchState.RUNNING:
        dispatch(batch.pk)


def batch_page_path(batch: ResignBatch) -> str:
    return reverse("approvals:resign-batch", args=[batch.pk])


def notify_approvers(batch: ResignBatch) -> int:
    """Email the authority's approvers that a re-sign batch waits for their decision."""
    users = (
        get_user_model()
        .objects.filter(groups__name=approver_group(batch.authority), is_active=True)
        .exclude(email="")
    )
    subject = f"[modelsign] approve re-signing {batch.total} {batch.authority} signatures"
    body = (
        f"{batch.total} signatures of the {batch.authority} key {batch.old_key.fingerprint} "
        f"({batch.reason}) are to be re-signed with the key {batch.new_key.fingerprint}; "
        f"{batch.required_approvals} approvals are needed.\n\n"
        f"Review: {settings.PUBLIC_URL}{batch_page_path(batch)}\n"
    )
    messages = [(subject, body, settings.DEFAULT_FROM_EMAIL, [u.email]) for u in users]
    return send_mass_mail(messages, fail_silently=True) if messages else 0


# --- running ---------------------------------------------------------------------------


def dispatch(batch_id: Any) -> None:
    """Re-sign a running batch's remaining signatures once the current transaction commits.

    ``SIGNING_MODE=worker`` hands them to the worker in chunks; ``inline`` (development and
    most tests) re-signs them in this process and never touches a broker.
    """
    if settings.SIGNING_MODE == "worker":
        from worker.tasks.resign import enqueue_batch  # only worker mode imports Celery

        enqueue_batch(batch_id)
    else:
        transaction.on_commit(lambda: run_inline(batch_id), robust=True)


def chunks(ids: list[int], size: int | None = None) -> Iterator[list[int]]:
    size = size or CHUNK
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def run_inline(batch_id: Any) -> dict[str, int]:
    """Re-sign every remaining signature of a running batch here, chunk by chunk."""
    batch = ResignBatch.objects.get(pk=batch_id)
    outcomes: Counter[str] = Counter()
    if batch.state != BatchState.RUNNING:
        return {}
    for chunk in chunks(list(remaining(batch).order_by("pk").values_list("pk", flat=True))):
        done, waiting = resign_many(batch_id, chunk)
        outcomes.update(done)
        if waiting:
            break  # the backend is down: the sweep tries again later
    finish_if_done(batch_id)
    return dict(outcomes)


def resign_many(batch_id: Any, signature_ids: list[int]) -> tuple[dict[str, int], list[int]]:
    """Re-sign these planned signatures of a batch; return (outcome counts, ids that wait).

    Outcomes are those of :func:`resign_one`. Signatures never tried are claimed with one
    UPDATE (an attempt counted on each, committed before the key is used), signed one after
    the other and stored in one transaction (:func:`_store_many`). Signatures tried before
    (their signer died, or their try failed) go one by one through :func:`resign_one`. The
    ids that wait are those left when the key backend became unavailable (not counted as
    attempts); try them again later. Finishing the batch is left to the caller.
    """
    batch = ResignBatch.objects.select_related("old_key", "new_key").filter(pk=batch_id).first()
    refused = _refuse_chunk(batch)
    if refused:
        return {refused: len(signature_ids)}, []
    assert batch is not None
    claimed = _claim(batch, signature_ids)
    outcomes, waiting = _resign_claimed(batch, claimed)
    singles = _tried_before(batch, [pk for pk in signature_ids if pk not in claimed])
    outcomes["done"] += len(signature_ids) - len(claimed) - len(singles)
    for position, pk in enumerate(singles):
        if waiting:
            waiting.extend(singles[position:])  # the backend is down: these would wait too
            break
        outcome = resign_one(pk, finish=False)
        if outcome == "waiting":
            waiting.append(pk)
        else:
            outcomes[outcome] += 1
    if waiting:
        outcomes["waiting"] = len(waiting)
    return {k: v for k, v in outcomes.items() if v}, waiting


def _refuse_chunk(batch: ResignBatch | None) -> str:
    """Why none of a chunk may be re-signed now (as :func:`resign_one` says it), or ""."""
    if batch is None:
        return "not_planned"
    if batch.state != BatchState.RUNNING:
        return "not_running"
    if not _may_sign_with(batch.new_key, batch.authority):
        return "key_not_active"  # the next plan moves them to a batch for the active key
    return ""


def _claim(batch: ResignBatch, ids: list[int]) -> set[int]:
    """Count the first attempt on each of ``ids`` planned in ``batch``, still to re-sign and
    never tried; return those. Committed on its own, before any key is used, so a signer
    killed after it has still used up the attempts."""
    with transaction.atomic():
        # Row locks (SQLite: the IMMEDIATE transaction's write lock) make two concurrent
        # claims of the same ids split them: each row goes to exactly one claimer.
        claimed = set(
            Signature.objects.select_for_update(skip_locked=True)
            .filter(
                pk__any=ids,
                resign_batch=batch,
                state__in=expected_states(batch),
                resign_attempts=0,
            )
            .values_list("pk", flat=True)
        )
        if claimed:
            Signature.objects.filter(pk__any=claimed).update(
                resign_attempts=F("resign_attempts") + 1
            )
    return claimed


def _tried_before(batch: ResignBatch, ids: list[int]) -> list[int]:
    """Those of ``ids`` that still need re-signing in ``batch`` (tried before, or capped)."""
    if not ids:
        return []
    return list(
        Signature.objects.filter(pk__any=ids, resign_batch=batch, state__in=expected_states(batch))
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def _resign_claimed(batch: ResignBatch, claimed: set[int]) -> tuple[Counter[str], list[int]]:
    """Sign the claimed signatures and store them together; (outcomes, ids that wait)."""
    outcomes: Counter[str] = Counter()
    sigs = _load(batch, claimed)
    outcomes["done"] += len(claimed) - len(sigs)
    # Production statements list their approvals: one query for the chunk, not one each.
    approvals = approvals_for_statements(s.request for s in sigs if s.request.required_approvals)
    built: list[tuple[_Old, _Built, str]] = []
    waiting: list[int] = []
    backend = None
    for position, sig in enumerate(sigs):
        if sig.resign_batch_id != batch.pk or sig.state not in expected_states(batch):
            outcomes["done"] += 1  # a concurrent single try finished it
            continue
        try:
            backend = backend or backend_for(batch.new_key)  # once: the same key signs them all
            built.append((sig, *_sign(sig, batch, approvals.get(sig.request_id), backend)))
        except BackendUnavailable as exc:
            waiting = [s.pk for s in sigs[position:]]
            log.warning("re-signing %d signatures waits for the %s backend: %s",
                        len(waiting), batch.authority, exc)  # fmt: skip
            break
        except Exception as exc:  # one signature's failure (even a bug) is its own
            outcomes[_failed_try(batch, sig, exc)] += 1
    try:
        outcomes.update(_store_many(batch, built))
    except OperationalError:
        waiting.extend(sig.pk for sig, _, _ in built)  # the database, not these signatures
        raise
    finally:
        # Not the signatures' fault: give the attempts back, they are tried in bulk again.
        if waiting:
            Signature.objects.filter(pk__any=waiting, resign_attempts__gt=0).update(
                resign_attempts=F("resign_attempts") - 1
            )
    return outcomes, waiting


@dataclass(slots=True)
class _Claimed:
    """A claimed signature as a chunk reads it: the columns re-signing uses, with its request
    (a model instance, for the statement) and key. Not a Signature: reading a chunk as
    Signatures with select_related cost ~87 us per signature here, as tuples ~26."""

    pk: int
    state: str
    payload_digest: str
    resign_batch_id: Any
    resign_attempts: int
    request: SigningRequest
    key: SigningKey | None

    @property
    def request_id(self) -> Any:
        return self.request.pk


#: A signature to re-sign: a chunk's are _Claimed, one tried on its own is a Signature.
_Old = Signature | _Claimed

#: What a chunk reads: its signatures' columns, their requests' statement fields and their
#: provenance's summary; not the rest (CI claims, timestamps, the provenance payload, bundles).
_SIGNATURE_COLUMNS = ("pk", "state", "payload_digest", "resign_batch_id", "resign_attempts", "key_id")  # fmt: skip
_REQUEST_COLUMNS = rows.in_model_order(SigningRequest, (
    "id", "authority", "model_name", "model_version", "resources", "ignore_paths", "requester",
    "statement_digest", "policy_digest", "required_approvals",
))  # fmt: skip
_PROVENANCE_COLUMNS = rows.in_model_order(ProvenanceRecord, (
    "request_id", "subject_digest", "builder_id", "build_type", "statement_digest",
))  # fmt: skip


def _load(batch: ResignBatch, ids: set[int]) -> list[_Claimed]:
    """The claimed signatures ``ids`` (those still there), in id order, with one query."""
    found = (
        Signature.objects.filter(pk__any=ids)
        .order_by("pk")
        .values_list(
            *_SIGNATURE_COLUMNS,
            *(f"request__{name}" for name in _REQUEST_COLUMNS),
            *(f"request__provenance__{name}" for name in _PROVENANCE_COLUMNS),
        )
    )
    keys = {batch.old_key_id: batch.old_key}  # the batch's signatures are the old key's
    db, n_sig, n_req = found.db, len(_SIGNATURE_COLUMNS), len(_REQUEST_COLUMNS)
    loaded = []
    for row in found:
        key_id = row[n_sig - 1]
        if key_id not in keys:
            keys[key_id] = SigningKey.objects.filter(pk=key_id).first()
        req = SigningRequest.from_db(db, _REQUEST_COLUMNS, row[n_sig : n_sig + n_req])
        summary = row[n_sig + n_req :]
        if summary[0] is None:  # no provenance record (its key is never null)
            mark_without_provenance(req)
        else:
            record = ProvenanceRecord.from_db(db, _PROVENANCE_COLUMNS, summary)
            SigningRequest.provenance.related.set_cached_value(req, record)  # type: ignore[attr-defined]
        loaded.append(_Claimed(*row[: n_sig - 1], request=req, key=keys[key_id]))
    return loaded


def _failed_try(batch: ResignBatch, sig: _Old, exc: Exception) -> str:
    """What one failed try of a claimed signature means: "failed" (given up) or "error"."""
    if isinstance(exc, _Permanent):
        _give_up(batch.pk, sig.pk, str(exc))
        return "failed"
    if not isinstance(exc, KeyBackendError | SigningRefused | bundle.BundleError):
        log.exception("re-signing %s failed unexpectedly (tried again on its own)", sig.pk)
    reason = getattr(exc, "message", None) or str(exc)
    if sig.resign_attempts >= MAX_ATTEMPTS:
        _give_up(batch.pk, sig.pk, f"gave up after {MAX_ATTEMPTS} attempts: {reason}")
        return "failed"
    log.warning("re-signing %s failed (tried again later): %s", sig.pk, reason)
    return "error"


def resign_one(signature_id: Any, *, finish: bool = True) -> str:
    """Re-sign one planned signature with its batch's new key; return what happened.

    ``"resigned"`` (done now), ``"done"`` (someone else did it, or it left the batch),
    ``"failed"`` (given up on: recorded in ``batch.failures``), ``"error"`` (this attempt
    failed; it is tried again), ``"waiting"`` (the key backend is unavailable; not counted),
    or why it was left alone: ``"not_planned"``, ``"not_running"``, ``"key_not_active"``.
    ``finish=False`` leaves the completion check to the caller (one per chunk, not per item).
    """
    # A primary-key lookup needs no ORDER BY (first() would add one, and compiling it costs
    # more than the query when 10,000 of these run back to back).
    found = list(
        Signature.objects.select_related("resign_batch__new_key", "key", "request").filter(
            pk=signature_id
        )[:1]
    )
    sig = found[0] if found else None
    if sig is None or sig.resign_batch is None:
        return "not_planned"
    batch = sig.resign_batch
    if batch.state != BatchState.RUNNING:
        return "not_running"
    if sig.state not in expected_states(batch):
        return "done"
    if not _may_sign_with(batch.new_key, batch.authority):
        return "key_not_active"  # the next plan moves it to a batch for the active key
    outcome = _attempt(sig, batch)
    if finish and outcome in ("resigned", "failed"):
        finish_if_done(batch.pk)
    return outcome


def _may_sign_with(key: SigningKey, authority: str) -> bool:
    """Whether the batch's new key (its row just read) is the authority's signing key now.

    No query: an authority has at most one active key (unique constraint), so a key that is
    active and inside its window is the one. :func:`_store` checks again under the row lock.
    """
    policy_authority = current_policy().authority(authority)
    return (
        policy_authority is not None
        and key.authority == authority
        and key.backend == policy_authority.backend
        and key.can_sign()
    )


def _attempt(sig: Signature, batch: ResignBatch) -> str:
    # Counted before the key is used, in its own statement: a signer killed mid-way (or a
    # signature that crashes its worker every time) still uses up its attempts.
    counted = Signature.objects.filter(
        pk=sig.pk, resign_batch=batch, state=sig.state, resign_attempts__lt=MAX_ATTEMPTS
    ).update(resign_attempts=F("resign_attempts") + 1)
    if not counted:
        current = Signature.objects.filter(pk=sig.pk).values("state", "resign_batch").first()
        if current is None or current["state"] != sig.state or current["resign_batch"] != batch.pk:
            return "done"
        _give_up(batch.pk, sig.pk, f"gave up after {MAX_ATTEMPTS} attempts")
        return "failed"
    try:
        built = _sign(sig, batch)
    except BackendUnavailable as exc:
        # Not the signature's fault: give the attempt back; it waits for the backend.
        Signature.objects.filter(pk=sig.pk, resign_attempts__gt=0).update(
            resign_attempts=F("resign_attempts") - 1
        )
        log.warning("re-signing %s waits for the %s backend: %s", sig.pk, batch.authority, exc)
        return "waiting"
    except _Permanent as exc:
        _give_up(batch.pk, sig.pk, str(exc))
        return "failed"
    except (KeyBackendError, SigningRefused, bundle.BundleError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        if sig.resign_attempts + 1 >= MAX_ATTEMPTS:
            _give_up(batch.pk, sig.pk, f"gave up after {MAX_ATTEMPTS} attempts: {reason}")
            return "failed"
        log.warning("re-signing %s failed (tried again later): %s", sig.pk, reason)
        return "error"
    return _store(sig, batch, *built)


class _Permanent(Exception):
    """This signature can never be re-signed as it is (trying again cannot help)."""


@dataclass(frozen=True)
class _Built:
    payload: bytes
    bundle_json: str
    signed_at: datetime


def _sign(
    sig: _Old,
    batch: ResignBatch,
    approvals: list[dict[str, str]] | None = None,
    backend: KeyBackend | None = None,
) -> tuple[_Built, str]:
    """Sign ``sig``'s statement again with the batch's new key; ``approvals`` and ``backend``
    when the caller has them for a whole chunk (else they are looked up here)."""
    req = sig.request
    try:
        base = bound_statement(req)
    except SigningRefused as exc:
        raise _Permanent(exc.message) from None
    key = batch.new_key
    reason = Reason.REVOCATION if sig.state == SignatureState.QUARANTINED else Reason.ROTATION
    signed_at = timezone.now()
    statement = _signed_statement(req, key, signed_at.isoformat(), base, approvals)
    statement["predicate"][bundle.SERVICE_PREDICATE_KEY]["supersedes"] = {
        "signature": sig.pk,
        "key_hint": sig.key.hint if sig.key else None,
        "payload_digest": sig.payload_digest,
        "reason": reason,
    }
    payload = bundle.statement_payload(statement)
    backend = backend or backend_for(key)
    _ensure_usable(backend, key)
    der = backend.sign(key.key_ref, bundle.pae(payload))
    _check_signature(key, payload, der)
    return _Built(payload, _bundle_json(key, payload, der), signed_at), reason


class _Lost(Exception):
    """Rolls back a re-signature whose old signature someone else already superseded."""


def _store(sig: _Old, batch: ResignBatch, built: _Built, reason: str) -> str:
    """New signature, old one superseded, audit record: one transaction, or none of them."""
    key = batch.new_key
    try:
        with transaction.atomic():
            if not SigningKey.objects.lock_if_active(key.pk):
                raise _Lost
            moved = Signature.objects.filter(pk=sig.pk, state=sig.state, resign_batch=batch).update(
                state=SignatureState.SUPERSEDED
            )
            if moved != 1:
                raise _Lost
            new = Signature.objects.store(_successor(sig, key, built), built.bundle_json)
            target, data = _resigned_record(batch, sig, new, reason)
            audit.record(ACTOR, "signature.resigned", target=target, data=data)
    except (IntegrityError, _Lost):
        return "done"  # someone else finished it (or its key changed): the stored state wins
    return "resigned"


class _Taken(Exception):
    """Rolls back a chunk of which someone else already superseded at least one signature."""


def _store_many(batch: ResignBatch, built: list[tuple[_Old, _Built, str]]) -> dict[str, int]:
    """:func:`_store` for many: all new signatures, the old ones superseded and one audit
    record each in one transaction, or none of them. If another signer took any of them,
    each is stored on its own instead (the stored state wins for the ones it took)."""
    if not built:
        return {}
    key = batch.new_key
    try:
        with transaction.atomic():
            if not SigningKey.objects.lock_if_active(key.pk):
                return {"done": len(built)}
            by_state: dict[str, list[int]] = {}
            for sig, _, _ in built:
                by_state.setdefault(sig.state, []).append(sig.pk)
            for state, pks in by_state.items():
                # Conditional: each must still be in the state it was signed for.
                moved = Signature.objects.filter(
                    pk__any=pks, state=state, resign_batch=batch
                ).update(state=SignatureState.SUPERSEDED)
                if moved != len(pks):
                    raise _Taken
            new = _create_successors(key, built)
            audit.record_many(
                ACTOR,
                "signature.resigned",
                (_resigned_record(batch, sig, successor, reason)
                 for (sig, _, reason), successor in zip(built, new, strict=True)),
            )  # fmt: skip
    except (IntegrityError, _Taken):
        outcomes = Counter(_store(sig, batch, one, reason) for sig, one, reason in built)
        return dict(outcomes)
    return {"resigned": len(built)}


def _create_successors(key: SigningKey, built: list[tuple[_Old, _Built, str]]) -> list[Signature]:
    return Signature.objects.store_many(
        (_successor(sig, key, one), one.bundle_json) for sig, one, _ in built
    )


def _successor(sig: _Old, key: SigningKey, built: _Built) -> Signature:
    """The unsaved signature that supersedes ``sig``."""
    return rows.new(
        Signature,
        request_id=sig.request_id,
        key_id=key.pk,
        payload_digest=bundle.payload_digest(built.payload),
        signed_at=built.signed_at,
        supersedes_id=sig.pk,
    )


def _resigned_record(
    batch: ResignBatch, sig: _Old, new: Signature, reason: str
) -> tuple[Signature, dict[str, Any]]:
    """The ``signature.resigned`` audit record of ``new`` (target and data)."""
    return new, {
        "request": str(sig.request_id), "authority": batch.authority, "batch": str(batch.pk),
        "reason": reason, "supersedes": sig.pk, "old_key": sig.key.hint if sig.key else None,
        "key": batch.new_key.hint, "old_payload_digest": sig.payload_digest,
        "payload_digest": new.payload_digest,
    }  # fmt: skip


def _give_up(batch_id: Any, signature_id: Any, reason: str) -> None:
    with transaction.atomic():
        # Locked: concurrent give-ups on one batch append to the same JSON list.
        batch = ResignBatch.objects.select_for_update().get(pk=batch_id)
        Signature.objects.filter(pk=signature_id).update(resign_attempts=MAX_ATTEMPTS)
        if any(f.get("signature") == signature_id for f in batch.failures):
            return
        batch.failures = [*batch.failures, {"signature": signature_id, "reason": reason}]
        batch.save(update_fields=["failures"])
        audit.record(
            ACTOR,
            "resign_batch.item_failed",
            target=batch,
            data={"signature": signature_id, "reason": reason},
        )


def finish_if_done(batch_id: Any) -> bool:
    """Complete a running batch with nothing left to try; resolve its incident if all done."""
    with transaction.atomic():
        batch = ResignBatch.objects.select_for_update().filter(pk=batch_id).first()
        if batch is None or batch.state != BatchState.RUNNING or remaining(batch).exists():
            return False
        _list_given_up(batch)
        _complete(batch, note="")
    return True


def _list_given_up(batch: ResignBatch) -> None:
    """Signatures whose attempts ran out without a recorded reason (their signer died)."""
    listed = {f.get("signature") for f in batch.failures}
    capped = Signature.objects.filter(
        resign_batch=batch, state__in=expected_states(batch), resign_attempts__gte=MAX_ATTEMPTS
    ).values_list("pk", flat=True)
    missing = [pk for pk in capped if pk not in listed]
    if missing:
        reason = f"gave up after {MAX_ATTEMPTS} attempts (the signer died or timed out)"
        batch.failures = [*batch.failures, *({"signature": pk, "reason": reason} for pk in missing)]
        batch.save(update_fields=["failures"])


def _complete(batch: ResignBatch, *, note: str) -> None:
    """Move a locked, open batch to ``completed``; audited in the caller's transaction."""
    now = timezone.now()
    ResignBatch.objects.filter(pk=batch.pk, state__in=OPEN_STATES).update(
        state=BatchState.COMPLETED, completed_at=now
    )
    audit.record(
        ACTOR,
        "resign_batch.completed",
        target=batch,
        data={"resigned": resigned_count(batch), "total": batch.total,
              "failures": len(batch.failures), "note": note},
    )  # fmt: skip
    if batch.incident_id:
        _resolve_incident_if_done(batch.incident_id)


def _resolve_incident_if_done(incident_id: Any) -> None:
    batches = ResignBatch.objects.filter(incident_id=incident_id)
    if not batches.exists() or batches.exclude(state=BatchState.COMPLETED).exists():
        return
    moved = Incident.objects.filter(pk=incident_id, state=Incident.State.OPEN).update(
        state=Incident.State.RESOLVED
    )
    if moved:
        audit.record(
            ACTOR,
            "incident.resolved",
            target=Incident.objects.get(pk=incident_id),
            data={"batches": [str(pk) for pk in batches.values_list("pk", flat=True)]},
        )


# --- approval --------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionOutcome:
    batch: ResignBatch
    decision: ResignDecision
    approvals_received: int


def approvals_needed(batch: ResignBatch) -> int:
    """The batch's quorum; never fewer than the policy asks for now (fail closed)."""
    authority = current_policy().authority(batch.authority)
    now_required = authority.approval_count if authority and authority.requires_approval else 0
    return max(batch.required_approvals, now_required)


def decide(
    batch_id: Any,
    user: Any,
    *,
    approve: bool,
    comment: str = "",
    otp_verified_at: datetime | None,
) -> DecisionOutcome:
    """Record one approver's decision on a pending batch; start it when the quorum is met."""
    with transaction.atomic():
        # The row lock makes concurrent decisions take turns, so the quorum count below
        # sees every earlier approval and the batch starts exactly once.
        batch = ResignBatch.objects.select_for_update().filter(pk=batch_id).first()
        _check_may_decide(batch, user)
        assert batch is not None
        verified_at = check_fresh_otp(otp_verified_at)
        decision = _record_decision(batch, user, approve, comment, verified_at)
        received = (
            ResignDecision.objects.filter(batch=batch, approve=True)
            .values("approver")
            .distinct()
            .count()
        )
        if not approve:
            _move(batch, BatchState.REJECTED, user, "resign_batch.rejected")
        elif received >= approvals_needed(batch):
            _move(batch, BatchState.RUNNING, user, "resign_batch.approved")
            dispatch(batch.pk)
    batch.refresh_from_db()
    return DecisionOutcome(batch, decision, received)


def _check_may_decide(batch: ResignBatch | None, user: Any) -> None:
    if batch is None:
        raise SigningRefused("not_found", "no such re-sign batch", status=404)
    if batch.authority not in approver_authorities(user):
        raise SigningRefused(
            "not_approver",
            f"only approvers of {batch.authority!r} may decide on its re-sign batches",
            status=403,
        )
    if ResignDecision.objects.filter(batch=batch, approver=user).exists():
        raise SigningRefused("already_decided", "you have already decided on this batch", 409)
    if batch.state != BatchState.PENDING_APPROVAL:
        raise SigningRefused(
            "not_pending", f"the batch is {batch.state}; only pending batches can be decided", 409
        )
    active = SigningKey.objects.active_for(batch.authority)
    if active is None or active.pk != batch.new_key_id:
        raise SigningRefused(
            "key_changed",
            "the batch's new key is no longer the active key; the next plan replaces the batch",
            409,
        )


def _record_decision(
    batch: ResignBatch, user: Any, approve: bool, comment: str, verified_at: datetime
) -> ResignDecision:
    try:
        with transaction.atomic():
            decision = ResignDecision.objects.create(
                batch=batch,
                approver=user,
                approve=approve,
                comment=comment[:1000],
                otp_verified_at=verified_at,
            )
    except IntegrityError:
        raise SigningRefused(
            "already_decided", "you have already decided on this batch", 409
        ) from None
    audit.record(
        identity_of(user),
        f"resign_decision.{'approve' if approve else 'reject'}",
        target=batch,
        data={"comment": comment[:200], "otp_verified_at": verified_at.isoformat(),
              "total": batch.total, "old_key": batch.old_key.hint, "new_key": batch.new_key.hint},
    )  # fmt: skip
    return decision


def _move(batch: ResignBatch, state: str, user: Any, action: str) -> None:
    changes: dict[str, Any] = {"state": state}
    if state == BatchState.RUNNING:
        changes["approved_at"] = timezone.now()
    moved = ResignBatch.objects.filter(pk=batch.pk, state=BatchState.PENDING_APPROVAL).update(
        **changes
    )
    if moved != 1:
        raise IntegrityError("the batch left pending_approval during the decision")
    audit.record(identity_of(user), action, target=batch, data={"state": state})


# --- progress (pages) ------------------------------------------------------------------


def progress(batch: ResignBatch) -> dict[str, Any]:
    """What the batch and incident pages show: n of N re-signed, failures, what it waits for."""
    done = resigned_count(batch)
    return {
        "batch": batch,
        "resigned": done,
        "failed": len(batch.failures),
        "left": remaining(batch).count() if batch.state in OPEN_STATES else 0,
    }


def visible_batches(user: Any) -> QuerySet[ResignBatch]:
    """Deny by default: an approver sees the batches of the authorities they approve for."""
    return ResignBatch.objects.filter(authority__in=approver_authorities(user))


def pending_for(user: Any) -> QuerySet[ResignBatch]:
    return (
        visible_batches(user)
        .filter(state=BatchState.PENDING_APPROVAL)
        .select_related("old_key", "new_key")
        .order_by("-created_at")
    )
