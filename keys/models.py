"""Signing keys and their state machine (SPEC section 5).

A ``SigningKey`` row never holds private material: ``key_ref`` is the backend's reference
(PKCS#11 token + key id, Vault key name + pinned version).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.conf import settings
from django.db import connections, models
from django.db.models import Q
from django.utils import timezone


class KeyState(models.TextChoices):
    PENDING = "pending"
    ACTIVE = "active"
    TRANSITION = "transition"
    RETIRED = "retired"
    REVOKED = "revoked"


class KeyBackendName(models.TextChoices):
    PKCS11 = "pkcs11"
    VAULT = "vault"
    SIGSTORE = "sigstore"


class SigningKeyManager(models.Manager["SigningKey"]):
    def active_for(self, authority: str, at: datetime | None = None) -> SigningKey | None:
        """The one key that may sign for ``authority`` now, or None.

        Every signature asks, so the SELECT is written out (``signing_service.rows`` says
        why); the times are prepared by the model's field, as a filter would. At most one
        row matches: the ``one_active_key_per_authority`` constraint.
        """
        at = at or timezone.now()
        connection = connections[self.db]
        when = self.model._meta.get_field("not_before").get_db_prep_value(at, connection)
        sql = (
            f"SELECT * FROM {connection.ops.quote_name(self.model._meta.db_table)} "  # noqa: S608
            "WHERE authority = %s AND state = %s "
            "AND not_before <= %s AND (not_after IS NULL OR not_after > %s)"
        )
        return next(iter(self.raw(sql, [authority, KeyState.ACTIVE, when, when])), None)

    def lock_if_active(self, key_id: int) -> bool:
        """In the transaction that stores a signature made with key ``key_id``, before
        anything else: share-lock the key's row; False if it is no longer active.

        The HSM call holds no lock, so the key may have been revoked (or rotated) since it
        was looked up. Revocation and every other state change take the row FOR UPDATE:
        they wait for the stores under way (and so quarantine what those stored), and the
        stores after them see the key no longer active and store nothing. Two stores do not
        wait for each other here. SQLite has one writer at a time (IMMEDIATE transactions,
        signing_service/env.py), so a plain read does.
        """
        connection = connections[self.db]
        if connection.vendor != "postgresql":
            return self.filter(pk=key_id, state=KeyState.ACTIVE).exists()
        meta, quote = self.model._meta, connection.ops.quote_name
        table, pk, state = (
            quote(meta.db_table), quote(meta.pk.column), quote(meta.get_field("state").column)
        )  # fmt: skip
        with connection.cursor() as cursor:  # the ORM has FOR UPDATE, not FOR SHARE
            cursor.execute(
                f"SELECT 1 FROM {table} WHERE {pk} = %s AND {state} = %s FOR SHARE",  # noqa: S608
                [key_id, KeyState.ACTIVE],
            )
            return cursor.fetchone() is not None


class SigningKey(models.Model):
    authority = models.CharField(max_length=64, db_index=True)
    backend = models.CharField(max_length=16, choices=KeyBackendName.choices)
    key_ref = models.JSONField(help_text="The backend's reference to the key; never key material.")
    algorithm = models.CharField(max_length=16, default="ECDSA-P256")
    public_key_pem = models.TextField()
    hint = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the public key PEM")
    state = models.CharField(max_length=16, choices=KeyState.choices, default=KeyState.PENDING)
    not_before = models.DateTimeField(default=timezone.now)
    not_after = models.DateTimeField(null=True, blank=True)
    attributes = models.JSONField(default=dict, blank=True, help_text="What was checked on the key")
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_effective_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.CharField(max_length=64, blank=True)
    #: When the key entered ``transition`` (a successor became active); retired after
    #: ``transition_days``.
    transitioned_at = models.DateTimeField(null=True, blank=True)
    #: When the rotation job first warned that this key is due for rotation.
    rotation_due_notified_at = models.DateTimeField(null=True, blank=True)
    #: When a destroy ceremony deleted the private key; the public record stays for verifiers.
    destroyed_at = models.DateTimeField(null=True, blank=True)
    certificate_chain_pem = models.TextField(
        blank=True,
        help_text="The org CA's certificate chain for this key, PEM, leaf first (no root); "
        "when set, bundles carry it instead of the key hint.",
    )

    objects = SigningKeyManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["authority"],
                condition=Q(state="active"),
                name="one_active_key_per_authority",
            )
        ]
        ordering = ["authority", "-created_at"]

    def __str__(self) -> str:
        return f"{self.authority}/{self.hint[:12]} ({self.state})"

    @property
    def fingerprint(self) -> str:
        return self.hint[:16]

    def can_sign(self, at: datetime | None = None) -> bool:
        at = at or timezone.now()
        in_window = self.not_before <= at and (self.not_after is None or at < self.not_after)
        return self.state == KeyState.ACTIVE and in_window


class CeremonyPurpose(models.TextChoices):
    CREATE = "create"
    DESTROY = "destroy"


class CeremonyState(models.TextChoices):
    OPEN = "open"
    COMPLETED = "completed"
    ABORTED = "aborted"
    EXPIRED = "expired"


class KeyCeremony(models.Model):
    """Creating a key needs ``ceremony_quorum`` distinct custodians, each with a fresh TOTP.

    The key is generated only when the quorum is complete, in the same transaction that
    records it; a ceremony that is aborted, expires or dies part-way leaves no usable key.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    authority = models.CharField(max_length=64)
    purpose = models.CharField(max_length=16, choices=CeremonyPurpose.choices)
    state = models.CharField(
        max_length=16, choices=CeremonyState.choices, default=CeremonyState.OPEN
    )
    quorum = models.PositiveSmallIntegerField()
    algorithm = models.CharField(max_length=16)
    backend = models.CharField(max_length=16, choices=KeyBackendName.choices)
    #: Null when the rotation job opened it: then every confirmation must come from a custodian.
    opened_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    #: For a rotation: the active key the new one will replace.
    replaces = models.ForeignKey(
        SigningKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    opened_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    key = models.ForeignKey(
        SigningKey, null=True, blank=True, on_delete=models.PROTECT, related_name="ceremonies"
    )
    note = models.CharField(max_length=500, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["authority", "purpose"],
                condition=Q(state="open"),
                name="one_open_ceremony_per_purpose",
            )
        ]
        ordering = ["-opened_at"]

    def __str__(self) -> str:
        return f"{self.purpose} ceremony for {self.authority} ({self.state})"


class CeremonyConfirmation(models.Model):
    ceremony = models.ForeignKey(
        KeyCeremony, on_delete=models.PROTECT, related_name="confirmations"
    )
    custodian = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    custodian_identity = models.CharField(max_length=320)
    confirmed_at = models.DateTimeField(default=timezone.now)
    otp_verified_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["ceremony", "custodian"], name="one_confirmation_per_custodian"
            )
        ]
        ordering = ["confirmed_at"]

    def __str__(self) -> str:
        return f"{self.custodian_identity} confirmed {self.ceremony_id}"


class Incident(models.Model):
    """A key revocation: what was quarantined, and who was told."""

    class State(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    key = models.ForeignKey(SigningKey, on_delete=models.PROTECT, related_name="incidents")
    reason = models.CharField(max_length=64)
    effective_at = models.DateTimeField()
    opened_at = models.DateTimeField(default=timezone.now)
    opened_by = models.CharField(max_length=320)
    state = models.CharField(max_length=16, choices=State.choices, default=State.OPEN)
    quarantined = models.PositiveIntegerField(default=0)
    #: [{"channel": "webhook"|"email", "to": ..., "ok": bool, "detail": ..., "at": ...}]
    notifications = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-opened_at"]

    def __str__(self) -> str:
        return f"incident {self.pk}: {self.key} {self.reason}"


class ResignBatch(models.Model):
    """Re-signing every signature of ``old_key`` that needs it with ``new_key``.

    Rotation re-signs the old key's valid signatures; revocation its quarantined ones. For an
    authority that requires approval the batch needs ``required_approvals`` distinct approvers
    (one decision each for the whole batch, shown its count and models) before it runs.
    """

    class Reason(models.TextChoices):
        ROTATION = "rotation"
        REVOCATION = "revocation"

    class State(models.TextChoices):
        PENDING_APPROVAL = "pending_approval"
        RUNNING = "running"
        COMPLETED = "completed"
        REJECTED = "rejected"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    authority = models.CharField(max_length=64)
    reason = models.CharField(max_length=16, choices=Reason.choices)
    old_key = models.ForeignKey(SigningKey, on_delete=models.PROTECT, related_name="+")
    new_key = models.ForeignKey(SigningKey, on_delete=models.PROTECT, related_name="+")
    incident = models.ForeignKey(
        Incident, null=True, blank=True, on_delete=models.PROTECT, related_name="resign_batches"
    )
    state = models.CharField(max_length=20, choices=State.choices)
    required_approvals = models.PositiveSmallIntegerField(default=0)
    #: How many signatures the batch covers, and [{model, version}] of them (for approvers).
    total = models.PositiveIntegerField(default=0)
    models_summary = models.JSONField(default=list, blank=True)
    #: [{"signature": id, "reason": ...}] of signatures given up on (attempt cap reached).
    failures = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    approved_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # One batch per (old key, new key): planning twice cannot re-sign twice.
            models.UniqueConstraint(fields=["old_key", "new_key"], name="one_batch_per_key_pair")
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"re-sign batch {self.pk}: {self.old_key} -> {self.new_key} ({self.state})"


class ResignDecision(models.Model):
    """One approver's decision on a production re-sign batch."""

    batch = models.ForeignKey(ResignBatch, on_delete=models.PROTECT, related_name="decisions")
    approver = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    approve = models.BooleanField()
    comment = models.CharField(max_length=1000, blank=True)
    decided_at = models.DateTimeField(default=timezone.now)
    otp_verified_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["batch", "approver"], name="one_decision_per_batch")
        ]
        ordering = ["decided_at"]

    def __str__(self) -> str:
        verdict = "approved" if self.approve else "rejected"
        return f"{self.approver_id} {verdict} re-sign batch {self.batch_id}"
