"""API v1 serializers: one for what a CI job writes, one for what it reads back."""

from __future__ import annotations

import unicodedata
from typing import Any

from django.conf import settings
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request

from keys.models import SigningKey
from provenance.models import provenance_of
from signing_service import slsa
from signing_service.manifest import ManifestError, check_ignore_path, validate_resources
from signing_service.models import Signature, SigningRequest
from signing_service.signing import Submission


def _safe_text(value: str) -> str:
    """Text that shows as what it is: no control, format (bidi) or separator characters."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise serializers.ValidationError(
                f"contains a control or formatting character U+{ord(ch):04X}"
            )
    if value != value.strip():
        raise serializers.ValidationError("has leading or trailing white space")
    return value


def _text(max_length: int, **kwargs: Any) -> serializers.CharField:
    return serializers.CharField(
        max_length=max_length, trim_whitespace=False, validators=[_safe_text], **kwargs
    )


class ResourceSchema(serializers.Serializer):
    name = serializers.CharField(help_text="POSIX path relative to the model root ('.' for a file)")
    algorithm = serializers.ChoiceField(choices=["sha256"], default="sha256")
    digest = serializers.RegexField(r"^[0-9a-f]{64}$", help_text="lowercase hex SHA-256")


class CiSerializer(serializers.Serializer):
    repository = _text(255, required=False)
    commit = _text(64, required=False)
    ref = _text(255, required=False)
    pipeline_url = serializers.URLField(max_length=2048, required=False)
    actor = _text(255, required=False)


class StrictSerializer(serializers.Serializer):
    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {name: ["is not a known field"] for name in unknown}
                )
        return super().to_internal_value(data)


class SigningRequestCreateSerializer(StrictSerializer):
    model = _text(255, help_text="Model name; becomes the statement's subject name")
    version = _text(128, help_text="Model version, e.g. a release tag or commit")
    environment = _text(64, help_text="Signing authority from the policy, e.g. staging")
    resources = serializers.JSONField(help_text="[{name, algorithm, digest}] for every file")
    ignore_paths = serializers.ListField(
        child=serializers.CharField(trim_whitespace=False), required=False, max_length=1000
    )
    ci = CiSerializer(required=False)
    provenance = serializers.JSONField(
        required=False,
        help_text="The model's SLSA provenance v1 (an in-toto Statement v1 whose one subject "
        "has the request's root digest); signed as a second bundle",
    )

    @extend_schema_field(ResourceSchema(many=True))
    def validate_resources(self, value: Any) -> Any:
        try:
            return validate_resources(value, max_resources=settings.MAX_RESOURCES)
        except ManifestError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_provenance(self, value: Any) -> slsa.Provenance:
        try:
            return slsa.parse_statement(value, max_bytes=settings.MAX_PROVENANCE_BYTES)
        except slsa.ProvenanceError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_ignore_paths(self, value: list[str]) -> list[str]:
        out = []
        for i, path in enumerate(value):
            try:
                out.append(check_ignore_path(path))
            except ManifestError as exc:
                raise serializers.ValidationError(f"[{i}] {exc}") from None
        return out

    def to_submission(self) -> Submission:
        data = self.validated_data
        return Submission(
            model=data["model"],
            version=data["version"],
            environment=data["environment"],
            resources=data["resources"],
            ignore_paths=data.get("ignore_paths", []),
            ci=dict(data.get("ci", {})),
            provenance=data.get("provenance"),
        )


def absolute(request: Request, path: str) -> str:
    base = settings.PUBLIC_URL
    return f"{base}{path}" if base else request.build_absolute_uri(path)


#: Renders like every DateTimeField of the API (settings' format, current time zone).
_DATETIME = serializers.DateTimeField()


class KeySummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = SigningKey
        fields = ["id", "authority", "algorithm", "hint", "state"]


class SigningRequestSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_name")
    version = serializers.CharField(source="model_version")
    environment = serializers.CharField(source="authority")
    resource_count = serializers.SerializerMethodField()
    approvals = serializers.SerializerMethodField()
    key = serializers.SerializerMethodField()
    provenance = serializers.SerializerMethodField()
    links = serializers.SerializerMethodField()

    class Meta:
        model = SigningRequest
        fields = [
            "id", "state", "model", "version", "environment", "requester", "actor", "ci",
            "root_digest", "statement_digest", "resource_count", "approvals", "key", "provenance",
            "failure_reason", "waiting_reason", "created_at", "updated_at", "expires_at", "signed_at", "links",
        ]  # fmt: skip

    def to_representation(self, instance: SigningRequest) -> dict[str, Any]:
        """The fields above, in their order, exactly as DRF renders them, without DRF
        building a ModelSerializer's fields for every instance (model introspection and a
        deep copy per response: a sixth of a signing request's CPU). The schema still comes
        from the declarations above; ``tests/test_api_representation.py`` pins this to
        DRF's own rendering of them."""
        obj = instance
        when = _DATETIME.to_representation
        return {
            "id": str(obj.id),
            "state": str(obj.state),
            "model": str(obj.model_name),
            "version": str(obj.model_version),
            "environment": str(obj.authority),
            "requester": str(obj.requester),
            "actor": str(obj.actor),
            "ci": obj.ci,
            "root_digest": str(obj.root_digest),
            "statement_digest": str(obj.statement_digest),
            "resource_count": self.get_resource_count(obj),
            "approvals": self.get_approvals(obj),
            "key": self.get_key(obj),
            "provenance": self.get_provenance(obj),
            "failure_reason": str(obj.failure_reason),
            "waiting_reason": str(obj.waiting_reason),
            "created_at": when(obj.created_at),
            "updated_at": when(obj.updated_at),
            "expires_at": None if obj.expires_at is None else when(obj.expires_at),
            "signed_at": None if obj.signed_at is None else when(obj.signed_at),
            "links": self.get_links(obj),
        }

    def get_resource_count(self, obj: SigningRequest) -> int:
        return len(obj.resources)

    @extend_schema_field(serializers.DictField())
    def get_approvals(self, obj: SigningRequest) -> dict[str, Any]:
        from approvals.services import valid_approvals

        records = [
            {"approver": a.approver_identity, "decided_at": a.decided_at}
            for a in valid_approvals(obj)
        ] if obj.required_approvals else []  # fmt: skip
        return {"required": obj.required_approvals, "received": len(records), "records": records}

    @extend_schema_field(KeySummarySerializer(allow_null=True))
    def get_key(self, obj: SigningRequest) -> dict[str, Any] | None:
        sig = obj.valid_signature()
        if sig is None:
            return None
        if sig.key is None:  # keyless: a short-lived Fulcio certificate, not a held key
            return {"keyless": True, "signer_identity": sig.signer_identity}
        key = sig.key  # KeySummarySerializer's fields, as it renders them
        return {
            "id": key.id,
            "authority": str(key.authority),
            "algorithm": str(key.algorithm),
            "hint": str(key.hint),
            "state": str(key.state),
        }

    @extend_schema_field(serializers.DictField(allow_null=True))
    def get_provenance(self, obj: SigningRequest) -> dict[str, Any] | None:
        record = provenance_of(obj)
        if record is None:
            return None
        return record.predicate_summary() | {
            "source_uri": record.source_uri,
            "source_commit": record.source_commit,
            "signed": record.is_signed,
        }

    @extend_schema_field(serializers.DictField())
    def get_links(self, obj: SigningRequest) -> dict[str, str | None]:
        request = self.context["request"]
        return {
            "self": absolute(request, reverse("api-v1:signing-request", args=[obj.id])),
            "bundle": absolute(request, reverse("api-v1:signing-request-bundle", args=[obj.id])),
            "provenance": absolute(
                request, reverse("api-v1:signing-request-provenance", args=[obj.id])
            )
            if provenance_of(obj) is not None
            else None,
            "approval_page": absolute(request, reverse("approvals:request", args=[obj.id]))
            if obj.required_approvals
            else None,
        }


class ApprovalCreateSerializer(StrictSerializer):
    decision = serializers.ChoiceField(choices=["approve", "reject"])
    comment = serializers.CharField(max_length=2000, required=False, allow_blank=True)
    otp_token = serializers.RegexField(
        r"^[0-9]{6,8}$",
        required=False,
        help_text="Authenticator code, if not verified in the last 5 min",
    )


class SigningKeySerializer(serializers.ModelSerializer):
    class Meta:
        model = SigningKey
        fields = [
            "id", "authority", "algorithm", "hint", "public_key_pem", "state", "backend",
            "not_before", "not_after", "revoked_at", "revocation_effective_at",
        ]  # fmt: skip


class SignatureSerializer(serializers.ModelSerializer):
    request = serializers.UUIDField(source="request_id")
    model = serializers.CharField(source="request.model_name")
    version = serializers.CharField(source="request.model_version")
    authority = serializers.CharField(source="request.authority")
    key = serializers.CharField(source="key.hint", default=None)
    supersedes = serializers.IntegerField(source="supersedes_id", allow_null=True)
    links = serializers.SerializerMethodField()

    class Meta:
        model = Signature
        fields = [
            "id", "request", "model", "version", "authority", "key", "signer_identity", "state",
            "signed_at", "payload_digest", "supersedes", "links",
        ]  # fmt: skip

    @extend_schema_field(serializers.DictField())
    def get_links(self, obj: Signature) -> dict[str, str]:
        path = reverse("api-v1:signature-bundle", args=[obj.pk])
        return {"bundle": absolute(self.context["request"], path)}


class VerifyRequestSerializer(StrictSerializer):
    deployment = _text(64, help_text="Deployment environment from the verification policy")
    bundle = serializers.JSONField(
        required=False, allow_null=True, help_text="The Sigstore bundle, as JSON; omit if unsigned"
    )
    provenance_bundle = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="The model's provenance bundle (from .../provenance), to check with the bundle",
    )
    resources = serializers.JSONField(
        required=False, help_text="The deployed model's [{name, algorithm, digest}], to compare"
    )
    mode = serializers.ChoiceField(choices=["strict", "warn", "permissive"], default="strict")

    def validate_resources(self, value: Any) -> Any:
        try:
            return validate_resources(value, max_resources=settings.MAX_RESOURCES)
        except ManifestError as exc:
            raise serializers.ValidationError(str(exc)) from None


class OciSigningRequestCreateSerializer(StrictSerializer):
    manifest = serializers.JSONField(
        help_text="OCI image manifest, as `skopeo inspect --raw` prints it"
    )
    model = _text(
        255, required=False, help_text="Model name (default: the manifest's title annotation)"
    )
    version = _text(128, help_text="Model version, e.g. the image tag")
    environment = _text(64, help_text="Signing authority from the policy, e.g. staging")
    ci = CiSerializer(required=False)

    def validate_manifest(self, value: Any) -> Any:
        from signing_service import oci

        try:
            self._resources = oci.layer_resources(value, max_resources=settings.MAX_RESOURCES)
        except ManifestError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        from signing_service import oci

        if not attrs.get("model"):
            attrs["model"] = oci.model_name(attrs["manifest"])
        if not attrs.get("model"):
            raise serializers.ValidationError(
                {"model": ["the manifest has no title annotation; name the model"]}
            )
        return attrs

    def to_submission(self) -> Submission:
        data = self.validated_data
        return Submission(
            model=data["model"],
            version=data["version"],
            environment=data["environment"],
            resources=self._resources,
            ignore_paths=[],
            ci=dict(data.get("ci", {})),
        )
