"""REST API v1: the audit log's signed checkpoints, for auditors.

Public, like the keys and the trust document: a checkpoint reveals only how many audit
entries there are, a hash and a time, and every copy kept outside the database makes
removing checkpoints harder to hide (see :mod:`signing_service.audit_checkpoints`).
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import exceptions, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from signing_service.api.views import errors
from signing_service.audit_checkpoints import CHECKPOINT_PAYLOAD_TYPE
from signing_service.models import AuditCheckpoint

MAX_LIMIT = 1000


class AuditCheckpointSerializer(serializers.ModelSerializer):
    key = serializers.CharField(source="key.hint", help_text="hint of the checkpoint key")
    envelope = serializers.SerializerMethodField(
        help_text=f"the DSSE envelope (payloadType {CHECKPOINT_PAYLOAD_TYPE}) as signed"
    )

    class Meta:
        model = AuditCheckpoint
        fields = ["number", "seq", "entry_hash", "created_at", "key", "envelope"]

    def get_envelope(self, obj: AuditCheckpoint) -> dict[str, Any]:
        envelope: dict[str, Any] = json.loads(obj.envelope)
        return envelope


class _Public(APIView):
    authentication_classes: list[type] = []
    permission_classes = [permissions.AllowAny]


class AuditCheckpointListView(_Public):
    @extend_schema(
        responses={
            200: inline_serializer(
                "AuditCheckpointList",
                {
                    "count": serializers.IntegerField(help_text="checkpoints in all"),
                    "results": AuditCheckpointSerializer(many=True),
                },
            ),
            **errors({400: "after or limit is not a non-negative whole number"}),
        },
        parameters=[
            OpenApiParameter("after", int, description="only checkpoints numbered above this"),
            OpenApiParameter("limit", int, description=f"at most this many (max {MAX_LIMIT})"),
        ],
        summary="The audit log's signed checkpoints, oldest first",
    )
    def get(self, request: Request) -> Response:
        after = _whole(request.query_params.get("after"), "after", 0)
        limit = min(_whole(request.query_params.get("limit"), "limit", 100), MAX_LIMIT)
        qs = AuditCheckpoint.objects.select_related("key").filter(number__gt=after)
        page = list(qs.order_by("number")[:limit])
        data = AuditCheckpointSerializer(page, many=True).data
        return Response({"count": AuditCheckpoint.objects.count(), "results": data})


class AuditCheckpointEnvelopeView(_Public):
    @extend_schema(
        responses={
            200: OpenApiResponse(description="the DSSE envelope JSON, as stored"),
            **errors({404: "no checkpoint with this number"}),
        },
        summary="One checkpoint's envelope, byte for byte (for verify_audit --checkpoint-file)",
    )
    def get(self, request: Request, number: int) -> HttpResponse:
        checkpoint = get_object_or_404(AuditCheckpoint.objects.all(), number=number)
        return HttpResponse(checkpoint.envelope, content_type="application/json")


def _whole(raw: str | None, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise exceptions.ValidationError({name: ["must be a non-negative whole number"]})
    return int(raw)
