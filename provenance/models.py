"""The provenance statement a signing request carries, and once signed, its bundle.

The statement is bound to the request: its digest is part of the request's statement digest,
so approvals cover it and the signer re-checks it. It is signed with the model, by the same
key, in the same transaction as the model's signature (see ``signing_service.signing``).
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, models
from django.utils import timezone

from keys.models import SigningKey
from signing_service import audit, bundle, slsa
from signing_service.models import SigningRequest


class ProvenanceRecord(models.Model):
    request = models.OneToOneField(
        SigningRequest, primary_key=True, on_delete=models.PROTECT, related_name="provenance"
    )
    statement = models.JSONField(help_text="The SLSA v1 in-toto statement, as hashed and signed")
    #: SHA-256 of the statement's canonical JSON: the provenance bundle's payload digest.
    statement_digest = models.CharField(max_length=64)
    subject_digest = models.CharField(max_length=64)
    builder_id = models.CharField(max_length=slsa.MAX_TEXT)
    build_type = models.CharField(max_length=slsa.MAX_TEXT)
    source_uri = models.CharField(max_length=slsa.MAX_TEXT, blank=True)
    source_commit = models.CharField(max_length=slsa.MAX_COMMIT, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    #: The Sigstore bundle of the statement, once the request is signed ("" until then).
    bundle = models.TextField(blank=True)
    key = models.ForeignKey(
        SigningKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    signed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"provenance of {self.request_id} by {self.builder_id}"

    @classmethod
    def for_submission(cls, req: SigningRequest, checked: slsa.Provenance) -> ProvenanceRecord:
        """An unsaved record for ``req``; ``req.provenance`` returns it without a query."""
        return cls(
            request=req,
            statement=checked.statement,
            statement_digest=checked.digest,
            subject_digest=checked.subject_digest,
            builder_id=checked.builder_id,
            build_type=checked.build_type,
            source_uri=checked.source_uri,
            source_commit=checked.source_commit,
        )

    @property
    def payload(self) -> bytes:
        return slsa.canonical_payload(self.statement)

    @property
    def is_signed(self) -> bool:
        return bool(self.bundle)

    def predicate_summary(self) -> dict[str, str]:
        """What the model's statement says about this provenance (bound by the approval)."""
        return {
            "subject_digest": self.subject_digest,
            "builder_id": self.builder_id,
            "build_type": self.build_type,
            "statement_digest": self.statement_digest,
        }

    def record_signature(self, key: SigningKey, bundle_json: str, signed_at: Any) -> None:
        """Store the bundle and audit it; call inside the model signature's transaction."""
        payload_digest = bundle.payload_digest(self.payload)
        # Conditional: a provenance is signed once; a second writer rolls the whole
        # transaction (model signature included) back.
        moved = ProvenanceRecord.objects.filter(pk=self.pk, bundle="").update(
            bundle=bundle_json, key=key, signed_at=signed_at
        )
        if moved != 1:
            raise IntegrityError("the provenance of this request is already signed")
        audit.record(
            "signing-service",
            "provenance.signed",
            target=self,
            data={
                "request": str(self.request_id),
                "key": key.hint,
                "builder_id": self.builder_id,
                "subject_digest": self.subject_digest,
                "payload_digest": payload_digest,
            },
        )


def provenance_of(req: SigningRequest) -> ProvenanceRecord | None:
    """The request's provenance, or None (cached on the request after the first look)."""
    try:
        return req.provenance  # type: ignore[no-any-return]
    except ProvenanceRecord.DoesNotExist:
        return None


def mark_without_provenance(req: SigningRequest) -> None:
    """Remember on an unsaved request that it has no provenance, so nobody queries for it."""
    SigningRequest.provenance.related.set_cached_value(req, None)  # type: ignore[attr-defined]
