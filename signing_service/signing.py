"""Submitting and signing requests: the rules live here, not in the views.

The flow for one request: :func:`submit` validates authority, scope and signer, stores the
request bound to the digest of its canonical statement, and audits it in one transaction.
:func:`sign` claims an approved request with a conditional UPDATE (so two callers cannot
both sign it), re-checks the digest and the policy, signs outside any transaction (an HSM
call must not hold database locks), then stores the signature, its audit record and the
state change in one transaction. Any failure leaves the request ``failed`` with a reason;
it never falls back to another key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from keys.backends.base import BackendUnavailable, KeyBackend, KeyBackendError
from keys.models import SigningKey
from keys.registry import backend_for
from provenance.models import ProvenanceRecord, mark_without_provenance, provenance_of
from signing_service import audit, bundle, metrics, rows
from signing_service.manifest import Resource, root_digest, sort_resources
from signing_service.models import (
    ApiToken,
    RequestState,
    Signature,
    SigningRequest,
)
from signing_service.oidc_config import current_oidc_config
from signing_service.policy import Authority, current_policy
from signing_service.slsa import Provenance

if TYPE_CHECKING:
    from signing_service.oidc import OidcCredential


class SigningRefused(Exception):
    """A request cannot be accepted or signed; ``code`` and ``status`` map to the API error."""

    def __init__(self, code: str, message: str, status: int = 400, details: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.details = code, message, status, details


class NoActiveKey(SigningRefused):
    """The authority has no key that may sign now: the request waits, it does not fail."""


@dataclass(frozen=True)
class Principal:
    """An authenticated CI caller: a verified identity and the authorities it may use."""

    identity: str
    authorities: frozenset[str]
    token: ApiToken | None = None
    actor: str = ""
    #: Set when the caller authenticated with a verified CI OIDC ID token.
    oidc: OidcCredential | None = None
    is_authenticated: bool = field(default=True, init=False)


@dataclass(frozen=True)
class Submission:
    model: str
    version: str
    environment: str
    resources: list[Resource]
    ignore_paths: list[str]
    ci: dict[str, str]
    #: Keyless only: the caller's OIDC identity token for Fulcio. Used once, never stored.
    identity_token: str | None = field(default=None, repr=False)
    #: The model's SLSA provenance, shape-checked; checked against the policy in submit().
    provenance: Provenance | None = field(default=None, repr=False)


# --- statements ------------------------------------------------------------------------


def _base_metadata(req: SigningRequest) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "request_id": str(req.id),
        "authority": req.authority,
        "model_version": req.model_version,
        "requester": req.requester,
    }
    # Part of the approved digest: an approval covers the provenance it was shown.
    if (record := provenance_of(req)) is not None:
        meta["provenance"] = record.predicate_summary()
    return meta


def base_statement(req: SigningRequest) -> dict[str, Any]:
    """The statement the request is bound to at creation (no signing-time fields)."""
    return bundle.build_statement(
        req.model_name,
        req.resource_list,
        ignore_paths=req.ignore_paths,
        service_metadata=_base_metadata(req),
    )


def statement_digest(req: SigningRequest) -> str:
    return _digest_of(base_statement(req))


def _digest_of(statement: dict[str, Any]) -> str:
    return bundle.payload_digest(bundle.statement_payload(statement))


def bound_statement(req: SigningRequest) -> dict[str, Any]:
    """The request's base statement, checked against the digest it was bound to."""
    base = base_statement(req)
    if _digest_of(base) != req.statement_digest:
        raise SigningRefused(
            "digest_mismatch", "the request's statement no longer matches its digest"
        )
    return base


def _signed_statement(
    req: SigningRequest,
    key: SigningKey | None,
    signed_at: str,
    base: dict[str, Any],
    approvals: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """``base`` (the request's :func:`bound_statement`, changed in place) with the signing-time
    fields added to the service's metadata. ``approvals``: the request's, if the caller
    fetched them with others' (else they are read here)."""
    base["predicate"][bundle.SERVICE_PREDICATE_KEY] |= {
        "statement_digest": req.statement_digest,
        "policy_digest": req.policy_digest,
        "key_hint": key.hint if key else None,
        "signed_at": signed_at,
        "approvals": _approvals_for_statement(req) if approvals is None else approvals,
    }
    return base


def _approvals_for_statement(req: SigningRequest) -> list[dict[str, str]]:
    if not req.required_approvals:
        return []
    from approvals.services import approvals_for_statement  # approvals builds on signing

    return approvals_for_statement(req)


def body_digest(sub: Submission) -> str:
    canonical = {
        "model": sub.model,
        "version": sub.version,
        "environment": sub.environment,
        "resources": [r.to_json() for r in sub.resources],
        "ignore_paths": sorted(sub.ignore_paths),
        "ci": sub.ci,
    }
    if sub.provenance is not None:  # absent otherwise: older requests keep their digest
        canonical["provenance"] = sub.provenance.digest
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


# --- submit ----------------------------------------------------------------------------


def authorize(principal: Principal, environment: str) -> Authority:
    """The authority for ``environment`` if this caller may request signatures from it."""
    policy = current_policy()
    authority = policy.authority(environment)
    if authority is None:
        known = ", ".join(sorted(policy.authorities))
        raise SigningRefused(
            "unknown_environment",
            f"unknown environment {environment!r}; known: {known}",
            details={"field": "environment"},
        )
    if principal.oidc is None and environment in current_oidc_config().require_oidc:
        raise SigningRefused(
            "oidc_required",
            f"{environment!r} accepts only CI OIDC ID tokens; API tokens are refused for it "
            "(modelsign sign --oidc)",
            status=403,
        )
    if environment not in principal.authorities:
        scope = ", ".join(sorted(principal.authorities)) or "none"
        raise SigningRefused(
            "token_scope",
            f"this credential may not sign for {environment!r} (scoped to: {scope})",
            status=403,
        )
    if not authority.allows_signer(principal.identity):
        raise SigningRefused(
            "signer_not_authorized",
            f"identity {principal.identity!r} is not an authorized signer for {environment!r}",
            status=403,
        )
    return authority


def check_keyless_identity(authority: Authority, identity_token: str | None) -> str:
    """The identity Fulcio will certify, if the policy allows it; before any network call.

    The token's signature is not verified here (Fulcio verifies it); this only keeps
    identities the policy does not allow from ever reaching Fulcio.
    """
    from keys.backends.base import KeyBackendError
    from keys.registry import sigstore_signer

    if not identity_token:
        raise SigningRefused(
            "identity_token_required",
            f"{authority.name!r} signs keyless: send the job's OIDC identity token in the "
            "Sigstore-Identity-Token header",
        )
    try:
        identity, _issuer = sigstore_signer().identity_of(identity_token)
    except KeyBackendError as exc:
        raise SigningRefused("identity_token_invalid", str(exc)) from None
    if not authority.allows_signer(identity):
        raise SigningRefused(
            "signer_not_authorized",
            f"identity {identity!r} is not in allowed_identities of {authority.name!r}",
            status=403,
        )
    return identity


def submit(
    principal: Principal, sub: Submission, idempotency_key: str | None
) -> tuple[SigningRequest, bool]:
    """Create (or, for a retried Idempotency-Key, return) a request. Returns (request, created)."""
    authority = authorize(principal, sub.environment)
    if sub.provenance is not None:
        check_provenance(authority, sub.provenance, sub.resources)
    if authority.backend == "sigstore":
        check_keyless_identity(authority, sub.identity_token)
    digest = body_digest(sub)
    if idempotency_key:
        existing = _replay(principal, idempotency_key, digest)
        if existing is not None:
            return existing, False
    # Key-based, no approval, inline: signed before anything is stored, then the request,
    # its signature and their audit records are stored in one transaction (see
    # _create_signed). Otherwise the request is stored, then claimed and signed (or not).
    sign_now = (
        authority.backend != "sigstore"
        and not authority.requires_approval
        and settings.SIGNING_MODE != "worker"
    )
    try:
        if sign_now:
            return _create_signed(principal, authority, sub, digest, idempotency_key), True
        req = _create(principal, authority, sub, digest, idempotency_key)
    except IntegrityError:
        # A concurrent retry with the same key won the insert; answer with its request.
        existing = _replay(principal, idempotency_key or "", digest)
        if existing is None:
            raise
        return existing, False
    if req.state == RequestState.APPROVED:
        if authority.backend == "sigstore":
            req = sign_keyless(req.pk, authority, sub.identity_token or "")
        else:
            req = sign_or_enqueue(req.pk)
    return req, True


def check_provenance(authority: Authority, checked: Provenance, resources: list[Resource]) -> None:
    """The provenance is for exactly this model and from a builder the authority allows."""
    details = {"field": "provenance"}
    if authority.backend == "sigstore":
        raise SigningRefused(
            "provenance_not_accepted",
            f"{authority.name!r} signs keyless and does not sign provenance; "
            "send provenance to a key-based authority",
            details=details,
        )
    if not authority.provenance_builders:
        raise SigningRefused(
            "provenance_not_accepted",
            f"{authority.name!r} accepts no provenance: add provenance_builders "
            "(globs on the SLSA builder id) to the authority in the policy file",
            details=details,
        )
    # The same root digest the model's statement will carry as its subject.
    root = root_digest(sort_resources(resources))
    if checked.subject_digest != root:
        raise SigningRefused(
            "provenance_mismatch",
            f"provenance.subject[0].digest.sha256 is {checked.subject_digest} but the "
            f"request's resources have the root digest {root}: the provenance is for other content",
            details=details,
        )
    if not authority.allows_builder(checked.builder_id):
        raise SigningRefused(
            "builder_not_allowed",
            f"provenance builder {checked.builder_id!r} is not in provenance_builders "
            f"of {authority.name!r}",
            details={"field": "provenance.predicate.runDetails.builder.id"},
        )


def _replay(principal: Principal, key: str, digest: str) -> SigningRequest | None:
    existing = SigningRequest.objects.filter(
        requester=principal.identity, idempotency_key=key
    ).first()
    if existing is not None and existing.body_digest != digest:
        raise SigningRefused(
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request body",
            status=422,
        )
    return existing


def _create(
    principal: Principal, authority: Authority, sub: Submission, digest: str, key: str | None
) -> SigningRequest:
    """Store the request and its audit record: approved, or pending approval."""
    needs_approval = authority.requires_approval
    state = RequestState.PENDING_APPROVAL if needs_approval else RequestState.APPROVED
    req, record, _ = _new_request(principal, authority, sub, digest, key, state)
    _insert_created(principal, req, sub, record, state)
    return req


def _create_signed(
    principal: Principal, authority: Authority, sub: Submission, digest: str, key: str | None
) -> SigningRequest:
    """Sign a new request, then store it signed: request, signature, the two audit records
    (created, as approved; signature issued) and a signed provenance, in one transaction.

    The HSM call holds no database lock, as in :func:`sign`, and until the commit there is
    nothing another caller could claim: a concurrent retry with the same Idempotency-Key
    signs too, its INSERT waits on the unique index and loses (IntegrityError, answered
    with the first request by :func:`submit`); an unstored signature is never published.
    The store share-locks the key first: a key revoked or rotated since it signed stores
    nothing, and the request is signed again with the key active then (or waits for one).
    Not signed now (no active key, backend down, refused): the request is stored as any
    other and waits or fails with its reason, as :func:`sign` leaves it.
    """
    req, record, base = _new_request(principal, authority, sub, digest, key, RequestState.SIGNING)
    for _ in range(_SIGN_ATTEMPTS):
        try:
            signing_key, payload, der, provenance = _signature_for(req, base)
        except _NOT_SIGNED as exc:
            _insert_created(principal, req, sub, record, RequestState.APPROVED)
            return _not_signed(req, exc)
        try:
            return _store_created(
                principal, req, sub, record, signing_key, payload, der, provenance
            )
        except _KeyChanged as exc:
            changed = exc  # nothing stored: sign again with the key active now, if any
    _insert_created(principal, req, sub, record, RequestState.APPROVED)
    return _wait(req, str(changed))


def _store_created(
    principal: Principal,
    req: SigningRequest,
    sub: Submission,
    record: ProvenanceRecord | None,
    signing_key: SigningKey,
    payload: bytes,
    der: bytes,
    provenance: tuple[bytes, bytes] | None,
) -> SigningRequest:
    """:func:`_create_signed`'s one transaction; :class:`_KeyChanged` before it writes."""
    now = timezone.now()
    sig = Signature(
        request=req, key=signing_key, payload_digest=bundle.payload_digest(payload), signed_at=now
    )
    bundle_json = _bundle_json(signing_key, payload, der)
    provenance_json = _bundle_json(signing_key, *provenance) if provenance else None
    with transaction.atomic():
        if not SigningKey.objects.lock_if_active(signing_key.pk):
            raise _KeyChanged(signing_key)
        req.state, req.signed_at = RequestState.SIGNED, now
        _insert_request(req, record)
        Signature.objects.store(sig, bundle_json)
        audit.record_each(
            [
                (principal.identity, "signing_request.created", req,
                 _created_audit(principal, req, sub, record, RequestState.APPROVED)),
                ("signing-service", "signature.issued", sig, _issued_audit(req, sig)),
            ]
        )  # fmt: skip
        if record is not None and provenance_json is not None:
            record.record_signature(signing_key, provenance_json, now)
    if record is not None:
        return SigningRequest.objects.select_related("provenance").get(pk=req.pk)
    req.remember_valid_signature(sig)
    return req


def _new_request(
    principal: Principal,
    authority: Authority,
    sub: Submission,
    digest: str,
    key: str | None,
    state: str,
) -> tuple[SigningRequest, ProvenanceRecord | None, dict[str, Any]]:
    """The unsaved request (bound to its statement digest), its provenance record, and the
    base statement it is bound to (built once; signing at submission goes on from it)."""
    policy = current_policy()
    now = timezone.now()
    req = SigningRequest(
        authority=authority.name,
        model_name=sub.model,
        model_version=sub.version,
        resources=[r.to_json() for r in sub.resources],
        ignore_paths=sorted(set(sub.ignore_paths)),
        policy_digest=policy.digest,
        required_approvals=authority.approval_count,
        state=state,
        requester=principal.identity,
        actor=principal.actor or sub.ci.get("actor", ""),
        # What the verified token says wins over what the job claims about itself.
        ci=sub.ci | dict(principal.oidc.ci) if principal.oidc else sub.ci,
        api_token=principal.token,
        idempotency_key=key,
        body_digest=digest,
        created_at=now,
        expires_at=now + timedelta(hours=policy.key_management.approval_ttl_hours)
        if state == RequestState.PENDING_APPROVAL
        else None,
    )
    # The statement's subject digest (build_statement's), without building a statement.
    req.root_digest = root_digest(sort_resources(sub.resources))
    record = None
    if sub.provenance is not None:
        record = ProvenanceRecord.for_submission(req, sub.provenance)
    else:
        mark_without_provenance(req)
    base = base_statement(req)
    req.statement_digest = _digest_of(base)
    return req, record, base


def _insert_created(
    principal: Principal,
    req: SigningRequest,
    sub: Submission,
    record: ProvenanceRecord | None,
    state: str,
) -> None:
    """Store the new request and its ``signing_request.created`` record, together."""
    with transaction.atomic():
        _insert_request(req, record)
        audit.record(
            principal.identity, "signing_request.created", target=req,
            data=_created_audit(principal, req, sub, record, state),
        )  # fmt: skip


def _insert_request(req: SigningRequest, record: ProvenanceRecord | None) -> None:
    rows.insert([req])  # every submission: see signing_service.rows
    if record is not None:
        record.save(force_insert=True)


def _created_audit(
    principal: Principal,
    req: SigningRequest,
    sub: Submission,
    record: ProvenanceRecord | None,
    state: str,
) -> dict[str, Any]:
    """The ``signing_request.created`` record; ``state`` is what the policy decided (a
    request signed at submission, or claimed for it, was approved)."""
    return (
        {
            "authority": req.authority,
            "model": req.model_name,
            "version": req.model_version,
            "statement_digest": req.statement_digest,
            "resources": len(sub.resources),
            "token": principal.token.token_id if principal.token else None,
            "state": state,
        }
        | _oidc_audit(principal)
        | _provenance_audit(record)
    )


def _provenance_audit(record: ProvenanceRecord | None) -> dict[str, Any]:
    if record is None:
        return {}
    return {
        "provenance": {
            "statement_digest": record.statement_digest,
            "builder_id": record.builder_id,
        }
    }


def _oidc_audit(principal: Principal) -> dict[str, Any]:
    if principal.oidc is None:
        return {}
    cred = principal.oidc
    return {"oidc": {"issuer": cred.issuer, "subject": cred.subject, "jti": cred.jti}}


# --- sign ------------------------------------------------------------------------------


def sign_or_enqueue(request_id: Any) -> SigningRequest:
    """Sign now (``SIGNING_MODE=inline``) or hand the request to the Celery worker (``worker``).

    In worker mode the request is returned as it was handed over (``approved``), read before
    the worker can claim it, so the answer does not depend on how fast the worker is; the
    caller polls for the result.
    """
    if settings.SIGNING_MODE != "worker":
        return sign(request_id)
    from worker.tasks.signing import enqueue_signing  # only worker mode imports Celery

    req = SigningRequest.objects.select_related("provenance").get(pk=request_id)
    enqueue_signing(request_id)
    return req


#: Waiting requests one key activation signs in its own process (inline mode); the worker's
#: reconcile takes any beyond this.
SIGN_WAITING_LIMIT = 1000


def waiting_ids(authority: str, limit: int = SIGN_WAITING_LIMIT) -> list[Any]:
    """The approved requests of ``authority`` that wait (no key, backend down), oldest first."""
    return list(
        SigningRequest.objects.filter(authority=authority, state=RequestState.APPROVED)
        .exclude(waiting_reason="")
        .order_by("updated_at")
        .values_list("pk", flat=True)[:limit]
    )


def sign_waiting(authority: str) -> int:
    """Sign, here, the requests of ``authority`` that wait; return how many were signed.

    Each goes through :func:`sign`, so a request a worker claimed meanwhile is left to it.
    """
    return sum(sign(pk).state == RequestState.SIGNED for pk in waiting_ids(authority))


def sign(request_id: Any) -> SigningRequest:
    """Sign an approved request at most once; return it in its new state."""
    claimed = SigningRequest.objects.filter(pk=request_id, state=RequestState.APPROVED).update(
        state=RequestState.SIGNING, updated_at=timezone.now()
    )
    req = SigningRequest.objects.select_related("provenance").get(pk=request_id)
    if not claimed:
        return req  # someone else claimed it, or it is not approved
    return _sign_claimed(req)


def _sign_claimed(req: SigningRequest) -> SigningRequest:
    """Sign a request this caller moved to ``signing``; store, wait or fail it."""
    for _ in range(_SIGN_ATTEMPTS):
        try:
            key, payload, der, provenance = _signature_for(req)
        except _NOT_SIGNED as exc:
            return _not_signed(req, exc)
        try:
            return _store(req, key, payload, der, provenance)
        except _KeyChanged as exc:
            changed = exc  # nothing stored: sign again with the key active now, if any
    return _wait(req, str(changed))


def _signature_for(
    req: SigningRequest, base: dict[str, Any] | None = None
) -> tuple[SigningKey, bytes, bytes, tuple[bytes, bytes] | None]:
    """Checks, then the HSM: (key, payload, DER signature, provenance's). Stores nothing.

    ``base``: the base statement of a request built just now (:func:`_new_request`), which
    needs no check against its digest; a stored request's is rebuilt and checked."""
    key, base = _check_before_signing(req, base)
    backend = backend_for(key)
    _ensure_usable(backend, key)
    signed_at = timezone.now().isoformat()
    payload = bundle.statement_payload(_signed_statement(req, key, signed_at, base))
    started = time.perf_counter()
    der = backend.sign(key.key_ref, bundle.pae(payload))
    metrics.observe_signing(key.backend, time.perf_counter() - started)
    _check_signature(key, payload, der)
    return key, payload, der, _sign_provenance(req, key, backend)


#: Why a request is not signed now: it waits (no key, backend down) or fails.
_NOT_SIGNED = (NoActiveKey, BackendUnavailable, SigningRefused, KeyBackendError)

#: Signing and storing tries for one request: a key can stop being active between the HSM
#: call and the store (revoked, rotated); then it is signed again with the key active then.
_SIGN_ATTEMPTS = 2


class _KeyChanged(Exception):
    """The key stopped being active after it signed: nothing was stored (see
    :meth:`keys.models.SigningKeyManager.lock_if_active`)."""

    def __init__(self, key: SigningKey) -> None:
        super().__init__(
            f"key {key.fingerprint} of {key.authority!r} stopped being active (revoked or "
            "rotated) while the request was signed; it is signed once a key is active"
        )


def _not_signed(req: SigningRequest, exc: Exception) -> SigningRequest:
    if isinstance(exc, NoActiveKey):
        return _wait(req, str(exc))
    if isinstance(exc, BackendUnavailable):
        # Never another key: the request waits for this one's backend to come back.
        return _wait(req, f"the {req.authority} key backend is unavailable: {exc}")
    return _fail(req, str(exc))


def sign_keyless(request_id: Any, authority: Authority, identity_token: str) -> SigningRequest:
    """Sign with a short-lived Fulcio certificate for the caller; the log entry is in the bundle."""
    from keys.backends.base import KeyBackendError
    from keys.registry import sigstore_signer

    claimed = SigningRequest.objects.filter(pk=request_id, state=RequestState.APPROVED).update(
        state=RequestState.SIGNING, updated_at=timezone.now()
    )
    req = SigningRequest.objects.get(pk=request_id)
    if not claimed:
        return req
    try:
        statement = _signed_statement(req, None, timezone.now().isoformat(), bound_statement(req))
        signer = sigstore_signer()
        identity, _ = signer.identity_of(identity_token)
        result = signer.sign_statement(
            statement, identity_token, allowed_identities=authority.authorized_signers
        )
    except (SigningRefused, KeyBackendError) as exc:
        return _fail(req, str(exc))
    bundle_json = json.dumps(result, indent=2) + "\n"
    return _record_signature(req, None, bundle_json, bundle.statement_payload(statement), identity)


def _check_before_signing(
    req: SigningRequest, base: dict[str, Any] | None = None
) -> tuple[SigningKey, dict[str, Any]]:
    """The key to sign ``req`` with now, and the request's checked base statement."""
    base = bound_statement(req) if base is None else base
    authority = current_policy().authority(req.authority)
    if authority is None:
        raise SigningRefused(
            "policy_changed", f"authority {req.authority!r} is no longer in the policy"
        )
    if authority.backend == "sigstore":
        raise SigningRefused(
            "keyless_expired", "keyless requests are signed only while they are submitted"
        )
    if not authority.allows_signer(req.requester):
        raise SigningRefused(
            "policy_changed", f"{req.requester!r} is no longer an authorized signer"
        )
    if authority.requires_approval and req.required_approvals < authority.approval_count:
        raise SigningRefused("policy_changed", "the authority now requires more approvals")
    if req.required_approvals:
        _check_approvals(req)
    key = SigningKey.objects.active_for(req.authority)
    if key is None:
        raise NoActiveKey(
            "no_active_key",
            f"no active signing key for authority {req.authority!r} "
            "(revoked, expired or not yet created); it is signed once a new key is active",
        )
    if key.backend != authority.backend:
        raise SigningRefused(
            "policy_changed",
            f"the active key is on {key.backend} but the policy requires {authority.backend}",
        )
    return key, base


def _check_approvals(req: SigningRequest) -> None:
    """Right before the key is used: the approvals still cover this digest and policy."""
    from approvals.services import is_own_request, valid_approvals

    approvals = list(valid_approvals(req).select_related("approver"))
    people = {a.approver_id for a in approvals if not is_own_request(a.approver, req)}
    if len(people) < req.required_approvals:
        raise SigningRefused(
            "approvals_missing",
            f"{len(people)} valid approvals for this statement and policy; "
            f"{req.required_approvals} required",
        )


# Keys whose attributes this process has already checked on the backend.
_usable_checked: set[int] = set()


def _ensure_usable(backend: KeyBackend, key: SigningKey) -> None:
    if key.pk not in _usable_checked:
        backend.check_usable(key.key_ref)
        _usable_checked.add(key.pk)


@functools.lru_cache(maxsize=64)
def _public_key(pem: str) -> ec.EllipticCurvePublicKey:
    """Parsed once per process and PEM (the key row's text is what is checked against)."""
    return bundle.load_public_key(pem)


def _check_signature(key: SigningKey, payload: bytes, der: bytes) -> None:
    """Fail closed if the backend signed with a key other than the one on record."""
    public = _public_key(key.public_key_pem)
    try:
        public.verify(der, bundle.pae(payload), ec.ECDSA(bundle.curve_hash(public)))
    except InvalidSignature:
        raise SigningRefused(
            "backend_mismatch", "the key backend returned a signature that does not verify"
        ) from None


def _sign_provenance(
    req: SigningRequest, key: SigningKey, backend: KeyBackend
) -> tuple[bytes, bytes] | None:
    """Sign the request's provenance (if any) with the model's key: (payload, DER signature)."""
    record = provenance_of(req)
    if record is None:
        return None
    payload = record.payload
    if bundle.payload_digest(payload) != record.statement_digest:
        raise SigningRefused(
            "digest_mismatch", "the request's provenance no longer matches its digest"
        )
    der = backend.sign(key.key_ref, bundle.pae(payload))
    _check_signature(key, payload, der)
    return payload, der


def _bundle_json(key: SigningKey, payload: bytes, der: bytes) -> str:
    if key.certificate_chain_pem:
        # A key with an org CA certificate ships its chain (leaf first) so verifiers can
        # trust it through their CA root instead of holding our public key.
        chain = x509.load_pem_x509_certificates(key.certificate_chain_pem.encode("ascii"))
        ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        built = bundle.build_bundle(payload, der, certificate_chain_der=ders)
    else:
        built = bundle.build_bundle(payload, der, hint=key.hint)
    return bundle.bundle_bytes(built).decode()


def _store(
    req: SigningRequest,
    key: SigningKey,
    payload: bytes,
    der: bytes,
    provenance: tuple[bytes, bytes] | None = None,
) -> SigningRequest:
    provenance_json = _bundle_json(key, *provenance) if provenance else None
    return _record_signature(
        req, key, _bundle_json(key, payload, der), payload, provenance_bundle=provenance_json
    )


def _record_signature(
    req: SigningRequest,
    key: SigningKey | None,
    bundle_json: str,
    payload: bytes,
    signer_identity: str = "",
    *,
    provenance_bundle: str | None = None,
) -> SigningRequest:
    """Signature, its audit record and the state change: one transaction, or none of them.

    With ``provenance_bundle``, the provenance's bundle and its audit record join them.
    A key no longer active (revoked or rotated since it signed) raises :class:`_KeyChanged`
    before anything is written.
    """
    now = timezone.now()
    try:
        with transaction.atomic():
            if key is not None and not SigningKey.objects.lock_if_active(key.pk):
                raise _KeyChanged(key)
            sig = Signature.objects.store(
                Signature(
                    request=req,
                    key=key,
                    signer_identity=signer_identity,
                    payload_digest=bundle.payload_digest(payload),
                    signed_at=now,
                ),
                bundle_json,
            )
            moved = SigningRequest.objects.filter(pk=req.pk, state=RequestState.SIGNING).update(
                state=RequestState.SIGNED, signed_at=now, updated_at=now, waiting_reason=""
            )
            if moved != 1:
                raise IntegrityError("request left the signing state while it was being signed")
            # The audit head is every writer's lock: taken last, held only until the commit.
            audit.record(
                "signing-service", "signature.issued", target=sig, data=_issued_audit(req, sig)
            )
            if provenance_bundle is not None and key is not None:
                record = provenance_of(req)
                if record is None:
                    raise IntegrityError("the request's provenance disappeared while it was signed")
                record.record_signature(key, provenance_bundle, now)
    except IntegrityError:
        # Already signed by this key, or taken away: the stored state is the truth.
        return SigningRequest.objects.select_related("provenance").get(pk=req.pk)
    if provenance_bundle is not None:
        return SigningRequest.objects.select_related("provenance").get(pk=req.pk)
    # Committed: the row is ``req`` with exactly the fields the UPDATE above set, and its
    # one valid signature is ``sig`` (no re-read, the caller answers with them).
    req.state, req.signed_at, req.updated_at, req.waiting_reason = (
        RequestState.SIGNED, now, now, "",
    )  # fmt: skip
    req.remember_valid_signature(sig)
    return req


def _issued_audit(req: SigningRequest, sig: Signature) -> dict[str, Any]:
    return {
        "request": str(req.id),
        "authority": req.authority,
        "key": sig.key.hint if sig.key else None,
        "signer_identity": sig.signer_identity or None,
        "model": req.model_name,
        "version": req.model_version,
        "payload_digest": sig.payload_digest,
    }


def _wait(req: SigningRequest, reason: str) -> SigningRequest:
    """Hand a claimed request back to ``approved`` with the reason it waits.

    The worker's reconciler (or the key's activation) tries it again; the waiting reason is
    shown to the CI job polling the request. Audited when the reason changes, not on every try.
    """
    with transaction.atomic():
        previous = (
            SigningRequest.objects.filter(pk=req.pk)
            .values_list("waiting_reason", flat=True)
            .first()
        )
        moved = SigningRequest.objects.filter(pk=req.pk, state=RequestState.SIGNING).update(
            state=RequestState.APPROVED, waiting_reason=reason, updated_at=timezone.now()
        )
        if moved and previous != reason:
            audit.record(
                "signing-service", "signing_request.waiting", target=req, data={"reason": reason}
            )
    return SigningRequest.objects.get(pk=req.pk)


def _fail(req: SigningRequest, reason: str) -> SigningRequest:
    with transaction.atomic():
        moved = SigningRequest.objects.filter(pk=req.pk, state=RequestState.SIGNING).update(
            state=RequestState.FAILED, failure_reason=reason, updated_at=timezone.now()
        )
        if moved:
            audit.record(
                "signing-service", "signing_request.failed", target=req, data={"reason": reason}
            )
    return SigningRequest.objects.get(pk=req.pk)
