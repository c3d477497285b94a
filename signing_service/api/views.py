"""REST API v1 views. Authorization is checked in the service layer and by the querysets."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from keys.models import SigningKey
from signing_service.api.errors import error_body
from signing_service.api.serializers import (
    SigningKeySerializer,
    SigningRequestCreateSerializer,
    SigningRequestSerializer,
)
from signing_service.bundle import BUNDLE_MEDIA_TYPE
from signing_service.models import RequestState, SigningRequest
from signing_service.signing import submit

IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key", str, OpenApiParameter.HEADER,
    description="Makes a retried POST return the request the first attempt created.",
)  # fmt: skip


class SigningRequestCreateView(APIView):
    @extend_schema(
        request=SigningRequestCreateSerializer,
        responses={201: SigningRequestSerializer, 200: SigningRequestSerializer},
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
        serializer = SigningRequestCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        req, created = submit(request.user, serializer.to_submission(), key)
        body = SigningRequestSerializer(req, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class SigningRequestDetailView(APIView):
    @extend_schema(responses=SigningRequestSerializer, summary="A signing request's state")
    def get(self, request: Request, pk: Any) -> Response:
        req = get_object_or_404(SigningRequest.objects.visible_to(request.user), pk=pk)
        return Response(SigningRequestSerializer(req, context={"request": request}).data)


class SigningRequestBundleView(APIView):
    @extend_schema(
        responses={
            (200, BUNDLE_MEDIA_TYPE): OpenApiResponse(description="Sigstore bundle v0.3 JSON"),
            409: OpenApiResponse(description="not signed (yet)"),
        },
        summary="The signature bundle of a signed request",
    )
    def get(self, request: Request, pk: Any) -> HttpResponse | Response:
        req = get_object_or_404(SigningRequest.objects.visible_to(request.user), pk=pk)
        sig = req.valid_signature() if req.state == RequestState.SIGNED else None
        if sig is None:
            message = f"the request is {req.state}; a bundle exists only once it is signed"
            return Response(error_body("not_signed", message), status=409)
        response = HttpResponse(sig.bundle, content_type=BUNDLE_MEDIA_TYPE)
        response["Content-Disposition"] = 'attachment; filename="model.sig"'
        return response


class PublicView(APIView):
    """Public keys are public: verifiers fetch them without credentials."""

    authentication_classes: list[type] = []
    permission_classes = [permissions.AllowAny]


class KeyListView(PublicView):
    @extend_schema(
        responses=SigningKeySerializer(many=True),
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
        responses={(200, "application/x-pem-file"): OpenApiResponse(description="PEM")},
        summary="One public key as PEM, by its hint",
    )
    def get(self, request: Request, hint: str) -> HttpResponse:
        key = get_object_or_404(SigningKey.objects.exclude(state="pending"), hint=hint)
        return HttpResponse(key.public_key_pem, content_type="application/x-pem-file")
