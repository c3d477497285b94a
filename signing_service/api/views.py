"""REST API v1 views. Authorization is checked in the service layer and by the querysets."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import authentication, exceptions, permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from keys.models import SigningKey
from provenance.models import provenance_of
from signing_service.api.auth import ApiTokenAuthentication
from signing_service.api.errors import error_body
from signing_service.api.oidc import OidcAuthentication
from signing_service.api.serializers import (
    ApprovalCreateSerializer,
    OciSigningRequestCreateSerializer,
    SignatureSerializer,
    SigningKeySerializer,
    SigningRequestCreateSerializer,
    SigningRequestSerializer,
    VerifyRequestSerializer,
    absolute,
)
from signing_service.bundle import BUNDLE_MEDIA_TYPE
from signing_service.models import RequestState, Signature, SigningRequest
from signing_service.signing import submit
from signing_service.trust import TrustUnavailable, current_document

#: The one error shape (signing_service.api.errors), for the schema's 4xx/5xx answers.
API_ERROR = inline_serializer(
    "Error",
    {
        "error": inline_serializer(
            "ErrorDetail",
            {
                "code": serializers.CharField(help_text="machine-readable reason"),
                "message": serializers.CharField(help_text="what is wrong, for people"),
                "details": serializers.JSONField(allow_null=True, help_text="e.g. the field"),
            },
        )
    },
)


def errors(described: dict[int, str]) -> dict[int, OpenApiResponse]:
    """Error answers of an endpoint, each with the shared error body."""
    return {code: OpenApiResponse(API_ERROR, description=text) for code, text in described.items()}


UNAUTHENTICATED = "no credential, or an unknown, expired, revoked or malformed one"
SUBMIT_ERRORS = errors(
    {
        400: "invalid body (field named), unknown environment, bad Idempotency-Key, "
        "provenance refused, keyless authority without an identity token",
        401: UNAUTHENTICATED + " (OIDC: bad signature, audience, issuer, expiry, replay)",
        403: "not an authorized signer, token not scoped to the environment, "
        "the environment requires OIDC, or the OIDC token's claims are refused",
        413: "body larger than MAX_REQUEST_BODY_BYTES",
        422: "Idempotency-Key already used for a different body",
        503: "the OIDC issuer or the replay store cannot be reached",
    }
)

CREATED = OpenApiResponse(SigningRequestSerializer, description="the new request")
RETRIED = OpenApiResponse(
    SigningRequestSerializer,
    description="a retry (same Idempotency-Key, same body): the request the first attempt made",
)

IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key", str, OpenApiParameter.HEADER,
    description="Makes a retried POST return the request the first attempt created.",
)  # fmt: skip


class SigningRequestCreateView(APIView):
    serializer_class: type[SigningRequestCreateSerializer | OciSigningRequestCreateSerializer] = (
        SigningRequestCreateSerializer
    )

    @extend_schema(
        request=SigningRequestCreateSerializer,
        responses={201: CREATED, 200: RETRIED, **SUBMIT_ERRORS},
        parameters=[IDEMPOTENCY_HEADER],
        summary="Submit a model manifest to sign",
    )
    def post(self, request: Request) -> Response:
        key = request.META.get("HTTP_IDEMPOTENCY_KEY") or None
        if key is not None and (len(key) > 255 or not key.isprintable()):
            return Response(
                error_body("invalid", "Idempotency-Key must be at most 255 printable characters"),
                status=400,
            )
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        submission = serializer.to_submission()
        submission = replace(
            submission, identity_token=request.META.get("HTTP_SIGSTORE_IDENTITY_TOKEN")
        )
        req, created = submit(request.user, submission, key)
        if created and req.state == RequestState.PENDING_APPROVAL:
            from approvals.services import notify_approvers, request_page_path

            notify_approvers(req, absolute(request, request_page_path(req)))
        body = SigningRequestSerializer(req, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class OciSigningRequestCreateView(SigningRequestCreateView):
    """The same flow for an OCI image manifest: its layers are the files; none is pulled."""

    serializer_class = OciSigningRequestCreateSerializer

    @extend_schema(
        request=OciSigningRequestCreateSerializer,
        responses={201: CREATED, 200: RETRIED, **SUBMIT_ERRORS},
        parameters=[IDEMPOTENCY_HEADER],
        summary="Submit an OCI image manifest to sign (layers become resources)",
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


class SigningRequestDetailView(APIView):
    @extend_schema(
        responses={
            200: SigningRequestSerializer,
            **errors({401: UNAUTHENTICATED, 404: "no such request visible to this identity"}),
        },
        summary="A signing request's state",
    )
    def get(self, request: Request, pk: Any) -> Response:
        visible = SigningRequest.objects.visible_to(request.user).select_related("provenance")
        req = get_object_or_404(visible, pk=pk)
        return Response(SigningRequestSerializer(req, context={"request": request}).data)


class SigningRequestBundleView(APIView):
    @extend_schema(
        responses={
            (200, BUNDLE_MEDIA_TYPE): OpenApiResponse(description="Sigstore bundle v0.3 JSON"),
            **errors(
                {
                    401: UNAUTHENTICATED,
                    404: "no such request visible to this identity",
                    409: "not signed (yet)",
                }
            ),
        },
        summary="The signature bundle of a signed request",
    )
    def get(self, request: Request, pk: Any) -> HttpResponse | Response:
        req = get_object_or_404(SigningRequest.objects.visible_to(request.user), pk=pk)
        sig = req.valid_signature(with_bundle=True) if req.state == RequestState.SIGNED else None
        if sig is None:
            message = f"the request is {req.state}; a bundle exists only once it is signed"
            return Response(error_body("not_signed", message), status=409)
        response = HttpResponse(sig.bundle, content_type=BUNDLE_MEDIA_TYPE)
        response["Content-Disposition"] = 'attachment; filename="model.sig"'
        return response


class SigningRequestProvenanceView(APIView):
    @extend_schema(
        responses={
            (200, BUNDLE_MEDIA_TYPE): OpenApiResponse(
                description="Sigstore bundle v0.3 JSON of the SLSA provenance statement"
            ),
            **errors(
                {
                    401: UNAUTHENTICATED,
                    404: "no such request visible to this identity, or it carries no provenance",
                    409: "not signed (yet)",
                }
            ),
        },
        summary="The provenance bundle of a signed request (signed with the model, same key)",
    )
    def get(self, request: Request, pk: Any) -> HttpResponse | Response:
        visible = SigningRequest.objects.visible_to(request.user).select_related("provenance")
        req = get_object_or_404(visible, pk=pk)
        record = provenance_of(req)
        if record is None:
            message = "the request carries no provenance"
            return Response(error_body("no_provenance", message), status=404)
        if req.state != RequestState.SIGNED or not record.is_signed:
            message = f"the request is {req.state}; its provenance is signed with the model"
            return Response(error_body("not_signed", message), status=409)
        response = HttpResponse(record.bundle, content_type=BUNDLE_MEDIA_TYPE)
        response["Content-Disposition"] = 'attachment; filename="model.sig.provenance"'
        return response


class ApprovalCreateView(APIView):
    """Approve or reject as a logged-in person with a fresh TOTP; CI tokens can never approve."""

    authentication_classes = [authentication.SessionAuthentication]  # enforces CSRF

    @extend_schema(
        request=ApprovalCreateSerializer,
        responses={
            201: SigningRequestSerializer,
            **errors(
                {
                    400: "invalid body (decision must be approve or reject)",
                    403: "not logged in, no CSRF token, not an approver of the authority, "
                    "self-approval, or no authenticator code verified recently enough",
                    404: "no such signing request",
                    409: "not pending (signed, rejected, expired) or already decided by you",
                }
            ),
        },
        summary="Approve or reject a pending request (session + fresh TOTP)",
    )
    def post(self, request: Request, pk: Any) -> Response:
        from approvals.services import decide
        from approvals.views import _otp_verified_at, verify_otp

        serializer = ApprovalCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if data.get("otp_token") and not verify_otp(request._request, data["otp_token"]):
            raise exceptions.PermissionDenied("the authenticator code is not valid")
        outcome = decide(
            pk, request.user, data["decision"], comment=data.get("comment", ""),
            otp_verified_at=_otp_verified_at(request._request),
        )  # fmt: skip
        body = SigningRequestSerializer(outcome.request, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED)


class PublicView(APIView):
    """Public keys are public: verifiers fetch them without credentials."""

    authentication_classes: list[type] = []
    permission_classes = [permissions.AllowAny]


KEY_LIST = inline_serializer(
    "KeyList",
    {"count": serializers.IntegerField(), "results": SigningKeySerializer(many=True)},
)


class KeyListView(PublicView):
    @extend_schema(
        responses=KEY_LIST,
        parameters=[OpenApiParameter("authority", str), OpenApiParameter("state", str)],
        summary="Every authority's public keys",
    )
    def get(self, request: Request) -> Response:
        keys = SigningKey.objects.exclude(state="pending").order_by("authority", "-created_at")
        for name in ("authority", "state"):
            if request.query_params.get(name):
                keys = keys.filter(**{name: request.query_params[name]})
        data = SigningKeySerializer(keys, many=True).data
        return Response({"count": len(data), "results": data})


class KeyPemView(PublicView):
    @extend_schema(
        responses={
            (200, "application/x-pem-file"): OpenApiResponse(description="PEM"),
            **errors({404: "no key with this hint"}),
        },
        summary="One public key as PEM, by its hint",
    )
    def get(self, request: Request, hint: str) -> HttpResponse:
        key = get_object_or_404(SigningKey.objects.exclude(state="pending"), hint=hint)
        return HttpResponse(key.public_key_pem, content_type="application/x-pem-file")


TRUST_ENVELOPE = inline_serializer(
    "TrustEnvelope",
    {
        "payloadType": serializers.CharField(help_text="application/vnd.modelsign.trust.v1+json"),
        "payload": serializers.CharField(help_text="base64 of the trust document JSON"),
        "signatures": inline_serializer(
            "TrustSignature",
            {
                "keyid": serializers.CharField(help_text="hint of the signing (active) key"),
                "sig": serializers.CharField(help_text="base64 DER ECDSA over the DSSE PAE"),
            },
            many=True,
        ),
    },
)


class TrustDocumentView(PublicView):
    """Served from the database as stored: cheap, and the same bytes on every replica."""

    @extend_schema(
        responses={
            200: TRUST_ENVELOPE,
            **errors({503: "no active key could sign the trust document"}),
        },
        summary="The trust document for offline verifiers, signed by every active key",
    )
    def get(self, request: Request) -> HttpResponse | Response:
        try:
            doc = current_document()
        except TrustUnavailable as exc:
            return Response(error_body("trust_unavailable", str(exc)), status=503)
        response = HttpResponse(doc.envelope, content_type="application/json")
        # Revocations must reach verifiers: caches may keep it, but must revalidate.
        response["Cache-Control"] = "no-cache"
        return response


class SignatureListView(APIView):
    """Issued signatures, newest first, for runbooks, audits and pipelines."""

    authentication_classes = [
        OidcAuthentication,
        ApiTokenAuthentication,
        authentication.SessionAuthentication,
    ]
    FILTERS = ("model", "version", "state")

    @extend_schema(
        responses={
            200: inline_serializer(
                "SignatureList",
                {
                    "count": serializers.IntegerField(help_text="matching signatures in all"),
                    "limit": serializers.IntegerField(),
                    "offset": serializers.IntegerField(),
                    "results": SignatureSerializer(many=True),
                },
            ),
            **errors({400: "limit or offset is not a non-negative integer", 401: UNAUTHENTICATED}),
        },
        parameters=[OpenApiParameter(n, str) for n in ("key", "model", "version", "state")]
        + [OpenApiParameter("limit", int), OpenApiParameter("offset", int)],
        summary="Issued signatures (filter by key hint prefix, model, version, state)",
    )
    def get(self, request: Request) -> Response:
        qs = Signature.objects.visible_to(request.user).select_related("request", "key")
        params = request.query_params
        if params.get("key"):
            qs = qs.filter(key__hint__startswith=params["key"].lower())
        for name, field in (
            ("model", "request__model_name"),
            ("version", "request__model_version"),
            ("state", "state"),
        ):
            if params.get(name):
                qs = qs.filter(**{field: params[name]})
        limit, offset = (
            _bounded(params.get("limit"), 100, 1000),
            _bounded(params.get("offset"), 0, 10**9),
        )
        # Newest first: ids grow as signatures are stored (the primary key's index, read
        # backwards, serves the page).
        page = list(qs.order_by("-id")[offset : offset + limit])
        data = SignatureSerializer(page, many=True, context={"request": request}).data
        return Response({"count": qs.count(), "limit": limit, "offset": offset, "results": data})


class SignatureBundleView(APIView):
    authentication_classes = [
        OidcAuthentication,
        ApiTokenAuthentication,
        authentication.SessionAuthentication,
    ]

    @extend_schema(
        responses={
            (200, BUNDLE_MEDIA_TYPE): OpenApiResponse(description="Sigstore bundle v0.3 JSON"),
            **errors({401: UNAUTHENTICATED, 404: "no such signature visible to this identity"}),
        },
        summary="One issued signature's bundle",
    )
    def get(self, request: Request, pk: int) -> HttpResponse:
        sig = get_object_or_404(Signature.objects.visible_to(request.user).with_bundle(), pk=pk)
        return HttpResponse(sig.bundle, content_type=BUNDLE_MEDIA_TYPE)


def _bounded(raw: str | None, default: int, maximum: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise exceptions.ValidationError({"limit/offset": ["must be a non-negative integer"]})
    return min(int(raw), maximum)


class VerifyView(PublicView):
    """The deployment gate for admission controllers, from the service's own trust state."""

    @extend_schema(
        request=VerifyRequestSerializer,
        responses={
            200: inline_serializer(
                "Verdict",
                {
                    "verdict": serializers.ChoiceField(["accept", "reject"]),
                    "deployment": serializers.CharField(),
                    "mode": serializers.ChoiceField(["strict", "warn", "permissive"]),
                    "checks": inline_serializer(
                        "VerdictCheck",
                        {
                            "name": serializers.CharField(),
                            "ok": serializers.BooleanField(),
                            "detail": serializers.CharField(),
                        },
                        many=True,
                    ),
                },
            ),
            **errors(
                {
                    400: "invalid body, or a deployment the verification policy does not have",
                    413: "body larger than MAX_REQUEST_BODY_BYTES",
                    503: "no trust document could be signed",
                }
            ),
        },
        summary="Verify a bundle (and optionally a resource list) against a deployment's policy",
    )
    def post(self, request: Request) -> Response:
        from datetime import UTC, datetime

        from signing_service.client import gate
        from signing_service.client import trust as client_trust
        from signing_service.trust import TrustUnavailable, current_document

        serializer = VerifyRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            doc = client_trust.parse(current_document().envelope.encode())
        except TrustUnavailable as exc:
            return Response(error_body("trust_unavailable", str(exc)), status=503)
        resources = data.get("resources")
        raw = json.dumps(data["bundle"]).encode() if data.get("bundle") else None
        provenance = data.get("provenance_bundle")
        try:
            verdict = gate.evaluate(
                doc, data["deployment"], raw, mode=data["mode"], now=datetime.now(UTC),
                rehash=lambda statement: _resource_problems(statement, resources),
                provenance_data=json.dumps(provenance).encode() if provenance else None,
            )  # fmt: skip
        except client_trust.TrustError as exc:
            return Response(error_body("invalid", str(exc), {"field": "deployment"}), status=400)
        return Response(verdict.to_json())


def _resource_problems(statement: Any, resources: list[Any] | None) -> list[str]:
    """Compare the signed files with the deployed ones, when the caller sent them."""
    if resources is None:
        return []
    signed = {r.name: r.digest for r in statement.resources}
    given = {r.name: r.digest for r in resources}
    problems = [f"missing file: {n}" for n in sorted(signed.keys() - given.keys())]
    problems += [f"extra file: {n}" for n in sorted(given.keys() - signed.keys())]
    problems += [
        f"changed file: {n}" for n in sorted(signed.keys() & given.keys()) if signed[n] != given[n]
    ]
    return problems
