"""Approval records: one decision by one person, bound to a statement digest and policy."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from signing_service.models import SigningRequest


class Decision(models.TextChoices):
    APPROVE = "approve"
    REJECT = "reject"


class Approval(models.Model):
    request = models.ForeignKey(SigningRequest, on_delete=models.PROTECT, related_name="approvals")
    approver = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    #: The approver's identity as it travels in the signed statement (email, else username).
    approver_identity = models.CharField(max_length=320)
    decision = models.CharField(max_length=8, choices=Decision.choices)
    comment = models.TextField(blank=True, max_length=2000)
    statement_digest = models.CharField(max_length=64)
    policy_digest = models.CharField(max_length=64)
    decided_at = models.DateTimeField()
    otp_verified_at = models.DateTimeField(help_text="When the second factor was last verified")

    class Meta:
        constraints = [
            # One decision per person per request and policy version: a double click, a
            # second tab or a replayed POST cannot count the same person twice.
            models.UniqueConstraint(
                fields=["request", "approver", "policy_digest"], name="one_decision_per_person"
            )
        ]
        ordering = ["decided_at"]

    def __str__(self) -> str:
        return f"{self.decision} of {self.request_id} by {self.approver_identity}"
