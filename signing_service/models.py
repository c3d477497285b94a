"""Signing requests, issued signatures, CI API tokens, the audit log and its checkpoints."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from keys.models import SigningKey
from signing_service import rows
from signing_service.manifest import Resource


class RequestState(models.TextChoices):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    SIGNING = "signing"
    SIGNED = "signed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset(
    {
        RequestState.SIGNED,
        RequestState.REJECTED,
        RequestState.EXPIRED,
        RequestState.FAILED,
        RequestState.CANCELLED,
    }
)


class SigningRequestQuerySet(models.QuerySet["SigningRequest"]):
    def visible_to(self, principal: Any) -> SigningRequestQuerySet:
        """Deny by default: a CI identity sees only its own requests in its token's scope."""
        identity = getattr(principal, "identity", None)
        authorities = getattr(principal, "authorities", None)
        if not identity or not authorities:
            return self.none()
        return self.filter(requester=identity, authority__in=list(authorities))


class SigningRequest(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    authority = models.CharField(max_length=64)
    model_name = models.CharField(max_length=255)
    model_version = models.CharField(max_length=255)
    resources = models.JSONField(help_text="Sorted [{name, algorithm, digest}] as submitted")
    ignore_paths = models.JSONField(default=list)
    root_digest = models.CharField(max_length=64)
    #: SHA-256 of the canonical base statement; approvals and the signer check this.
    statement_digest = models.CharField(max_length=64)
    policy_digest = models.CharField(max_length=64)
    required_approvals = models.PositiveSmallIntegerField(default=0)
    state = models.CharField(max_length=20, choices=RequestState.choices)
    requester = models.CharField(max_length=320, help_text="The verified CI identity")
    actor = models.CharField(max_length=255, blank=True, help_text="Who triggered the CI job")
    ci = models.JSONField(default=dict, blank=True, help_text="CI provenance as claimed by the job")
    api_token = models.ForeignKey(
        "ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # NULL, not "", for "no key": the unique constraint must not match requests without one.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    body_digest = models.CharField(max_length=64, help_text="SHA-256 of the canonical request body")
    failure_reason = models.TextField(blank=True)
    #: Why an approved request is not signed yet (no active key, key backend unavailable).
    waiting_reason = models.TextField(blank=True)
    #: Times a signer claimed it; capped so a request that kills its worker is not retried forever.
    sign_attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    signed_at = models.DateTimeField(null=True, blank=True)

    objects = SigningRequestQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["requester", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="one_request_per_idempotency_key",
            )
        ]
        indexes = [
            # The approver listings' order (newest first, id breaking ties): a page is read
            # from the index and stops after its rows, however many requests are pending.
            models.Index(
                fields=["authority", "state", "-created_at", "-id"], name="req_auth_state_created"
            ),
            models.Index(
                fields=["model_name", "authority", "-created_at"], name="req_model_created"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_name}@{self.model_version} -> {self.authority} ({self.state})"

    @property
    def resource_list(self) -> list[Resource]:
        return [Resource(**r) for r in self.resources]

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def valid_signature(self, with_bundle: bool = False) -> Signature | None:
        """The newest valid signature; ``with_bundle``: its bundle in the same query."""
        remembered = self.__dict__.get("_valid_signature")
        if remembered is not None:
            return remembered  # type: ignore[no-any-return]
        sigs = self.signatures.with_bundle() if with_bundle else self.signatures.all()
        return sigs.filter(state=SignatureState.VALID).order_by("-signed_at").first()

    def remember_valid_signature(self, sig: Signature) -> None:
        """The signer just committed ``sig`` as this request's valid signature: answer with it
        without a query (this object only; a fresh read still asks the database)."""
        self.__dict__["_valid_signature"] = sig


def _bundle_row(sig: Signature, text: str) -> SignatureBundle:
    """The bundle row of the saved ``sig``, remembered on it (``sig.bundle`` asks nothing)."""
    row = rows.new(SignatureBundle, signature_id=sig.pk, json=text)
    Signature.stored_bundle.related.set_cached_value(sig, row)  # type: ignore[attr-defined]
    return row


class SignatureState(models.TextChoices):
    VALID = "valid"
    SUPERSEDED = "superseded"
    QUARANTINED = "quarantined"


class SignatureQuerySet(models.QuerySet["Signature"]):
    def visible_to(self, principal: Any) -> SignatureQuerySet:
        """Deny by default: CI identities see their own requests' signatures; custodians
        (session users) see their authorities'; everyone else sees nothing."""
        if isinstance(getattr(principal, "identity", None), str):
            return self.filter(request__in=SigningRequest.objects.visible_to(principal))
        if getattr(principal, "is_authenticated", False) and hasattr(principal, "groups"):
            from keys.ceremonies import custodian_authorities

            return self.filter(request__authority__in=custodian_authorities(principal))
        return self.none()

    def with_bundle(self) -> SignatureQuerySet:
        """Each signature with its bundle, in the same query (``sig.bundle`` asks nothing)."""
        return self.select_related("stored_bundle")

    def store(self, sig: Signature, bundle_json: str) -> Signature:
        """Insert the unsaved ``sig`` and its bundle: two INSERTs, in the caller's transaction
        (or one of their own). ``sig.bundle`` then answers without a query."""
        # savepoint=False: inside the caller's transaction this adds no SQL of its own.
        with transaction.atomic(using=self.db, savepoint=False):
            rows.insert([sig])  # the hot signing path: see signing_service.rows
            rows.insert([_bundle_row(sig, bundle_json)])
        return sig

    def store_many(self, signed: Iterable[tuple[Signature, str]]) -> list[Signature]:
        """:meth:`store` for many: the signatures inserted together, then their bundles with
        the primary keys the signatures were given (see :func:`signing_service.rows.insert`)."""
        pairs = list(signed)
        with transaction.atomic(using=self.db, savepoint=False):
            sigs = [sig for sig, _ in pairs]
            rows.insert(sigs)
            rows.insert([_bundle_row(sig, text) for sig, text in pairs])
        return sigs


class Signature(models.Model):
    """An issued signature. Its bundle (~3 KB) lives in :class:`SignatureBundle`, so that
    state changes (quarantine, supersede) rewrite small rows: both databases write a whole
    row again on UPDATE."""

    # Neither foreign key has an index of its own: one_signature_per_request_key starts with
    # the request, sig_key_signed with the key (every signature paid for two more indexes).
    request = models.ForeignKey(
        SigningRequest, on_delete=models.PROTECT, related_name="signatures", db_index=False
    )
    #: The service-held key that signed; null for keyless (Sigstore) signatures.
    key = models.ForeignKey(
        SigningKey,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="signatures",
        db_index=False,
    )
    #: For keyless signatures: the identity in the short-lived Fulcio certificate.
    signer_identity = models.CharField(max_length=320, blank=True)
    payload_digest = models.CharField(max_length=64, help_text="SHA-256 of the signed statement")
    state = models.CharField(
        max_length=16, choices=SignatureState.choices, default=SignatureState.VALID
    )
    # No index of its own: every UPDATE of a signature (quarantine, supersede) that is not
    # HOT writes an entry in every index; (key, signed_at) serves the queries by time.
    signed_at = models.DateTimeField(default=timezone.now)
    supersedes = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="superseded_by"
    )
    #: The re-sign batch this (old) signature belongs to, once one is planned for it.
    resign_batch = models.ForeignKey(
        "keys.ResignBatch",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,  # sig_resign_open starts with it
    )
    resign_attempts = models.PositiveSmallIntegerField(default=0)

    objects = SignatureQuerySet.as_manager()

    class Meta:
        constraints = [
            # A request is signed at most once per key: a retried job cannot publish twice.
            models.UniqueConstraint(fields=["request", "key"], name="one_signature_per_request_key")
        ]
        indexes = [
            models.Index(fields=["key", "signed_at"], name="sig_key_signed"),
            # A batch's signatures still to re-sign, found without visiting those done: the
            # completion check after each chunk stays as fast at 100,000 as at 100. Partial:
            # quarantining (signatures in no batch yet) does not pay for its upkeep. Not on
            # resign_attempts: counting an attempt changes no indexed column, so PostgreSQL
            # can update the row in place (HOT) instead of adding an entry to every index.
            models.Index(
                fields=["resign_batch", "state"],
                condition=Q(resign_batch__isnull=False),
                name="sig_resign_open",
            ),
        ]

    def __str__(self) -> str:
        return f"signature {self.pk} of {self.request_id} by {self.key_id} ({self.state})"

    @property
    def bundle(self) -> str:
        """The Sigstore bundle JSON, exactly as served. Read-only; one query unless loaded
        with :meth:`SignatureQuerySet.with_bundle` or stored by this process."""
        return self.stored_bundle.json


class SignatureBundle(models.Model):
    """One signature's Sigstore bundle, written once with it (:meth:`SignatureQuerySet.store`)
    and never changed. Kept out of the signature's row, which state changes rewrite."""

    signature = models.OneToOneField(
        Signature, primary_key=True, on_delete=models.PROTECT, related_name="stored_bundle"
    )
    json = models.TextField(help_text="The Sigstore bundle JSON, exactly as served")

    def __str__(self) -> str:
        return f"bundle of signature {self.signature_id}"


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ApiTokenQuerySet(models.QuerySet["ApiToken"]):
    def find_usable(self, token: str, at: datetime | None = None) -> ApiToken | None:
        at = at or timezone.now()
        found = self.filter(token_hash=_hash_token(token), revoked_at__isnull=True).first()
        if found is None or (found.expires_at is not None and found.expires_at <= at):
            return None
        return found


class ApiToken(models.Model):
    """A CI credential bound to one service identity and scoped to authorities.

    Only the SHA-256 of the token is stored; the token itself is shown once at creation.
    The token has 256 bits of entropy, so a fast hash is as good as a slow one here.
    """

    PREFIX = "mst_"

    identity = models.CharField(max_length=320)
    authorities = models.JSONField(help_text="Authority names this token may sign for")
    token_id = models.CharField(max_length=16, unique=True, help_text="Public part, for logs")
    token_hash = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.token_id} ({self.identity})"

    @classmethod
    def issue(
        cls,
        identity: str,
        authorities: list[str],
        expires_at: datetime | None,
        description: str = "",
    ) -> tuple[ApiToken, str]:
        token_id = secrets.token_hex(6)
        token = f"{cls.PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        row = cls.objects.create(
            identity=identity,
            authorities=sorted(set(authorities)),
            token_id=token_id,
            token_hash=_hash_token(token),
            description=description,
            expires_at=expires_at,
        )
        return row, token


class AppendOnlyQuerySet(models.QuerySet["AuditEntry"]):
    def update(self, **kwargs: Any) -> int:
        raise PermissionError("the audit log is append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise PermissionError("the audit log is append-only")


class AuditEntry(models.Model):
    """One hash-chained, append-only audit record. See :mod:`signing_service.audit`."""

    seq = models.PositiveBigIntegerField(unique=True)
    created_at = models.DateTimeField()
    actor = models.CharField(max_length=320)
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)  # indexed in Meta: equality only
    data = models.JSONField(default=dict)
    prev_hash = models.CharField(max_length=64)
    entry_hash = models.CharField(max_length=64)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["seq"]
        verbose_name_plural = "audit entries"
        # Not db_index=True: on PostgreSQL that adds a second (LIKE) index no query uses, and
        # every signature appends entries.
        indexes = [models.Index(fields=["target_id"], name="audit_target")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise PermissionError("the audit log is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise PermissionError("the audit log is append-only")


class AuditHead(models.Model):
    """The chain's head (one row). Locking it serialises appends across processes."""

    seq = models.PositiveBigIntegerField(default=0)
    entry_hash = models.CharField(max_length=64, default="0" * 64)

    def __str__(self) -> str:
        return f"audit head #{self.seq}"


class AppendOnlyCheckpoints(models.QuerySet["AuditCheckpoint"]):
    def update(self, **kwargs: Any) -> int:
        raise PermissionError("audit checkpoints are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise PermissionError("audit checkpoints are append-only")


class AuditCheckpoint(models.Model):
    """The checkpoint key's signature over the audit log's head at one moment.

    ``envelope`` (a DSSE envelope, see :mod:`signing_service.audit_checkpoints`) is the
    record; ``seq``, ``entry_hash`` and ``created_at`` are copies of its signed payload for
    queries, and ``verify_audit`` checks that they agree with it.
    """

    #: 1, 2, 3, ... with no gaps; signed, so a removed checkpoint leaves a visible gap.
    number = models.PositiveBigIntegerField(unique=True)
    #: The audit entry whose hash is signed (the checkpoint's own ``audit.checkpoint`` entry).
    seq = models.PositiveBigIntegerField(unique=True)
    entry_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField()
    key = models.ForeignKey(SigningKey, on_delete=models.PROTECT, related_name="audit_checkpoints")
    envelope = models.TextField(help_text="The DSSE envelope JSON, exactly as signed and served")

    objects = AppendOnlyCheckpoints.as_manager()

    class Meta:
        ordering = ["number"]

    def __str__(self) -> str:
        return f"audit checkpoint #{self.number} at entry {self.seq}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise PermissionError("audit checkpoints are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise PermissionError("audit checkpoints are append-only")


class TrustDocument(models.Model):
    """One version of the signed trust document (see :mod:`signing_service.trust`).

    Written once per version and served exactly as stored, so every replica serves the same
    bytes; the only later change is adding signatures of keys whose backend was down.
    """

    version = models.PositiveBigIntegerField(unique=True)
    content_digest = models.CharField(
        max_length=64, help_text="SHA-256 of the document without version and issued_at"
    )
    issued_at = models.DateTimeField()
    envelope = models.TextField(help_text="The DSSE envelope JSON, exactly as served")
    signed_by = models.JSONField(default=list, help_text="Hints of the keys that signed it")
    signatures_checked_at = models.DateTimeField(
        help_text="When signatures missing because a backend was down were last attempted"
    )

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"trust document v{self.version}"
