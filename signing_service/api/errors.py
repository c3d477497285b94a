"""One JSON error shape for the whole API: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from signing_service.signing import SigningRefused


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _flatten(detail: Any, prefix: str = "") -> list[str]:
    """DRF's nested error details as 'field.sub[2]: message' lines."""
    if isinstance(detail, dict):
        out: list[str] = []
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            path = f"{prefix}.{name}" if prefix and name else (prefix or name)
            out.extend(_flatten(value, path))
        return out
    if isinstance(detail, list):
        out = []
        for i, value in enumerate(detail):
            nested = isinstance(value, dict | list)
            out.extend(_flatten(value, f"{prefix}[{i}]" if nested else prefix))
        return out
    return [f"{prefix}: {detail}" if prefix else str(detail)]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, SigningRefused):
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        lines = _flatten(exc.detail)
        body = error_body("invalid", "; ".join(lines[:5]), exc.detail)
    elif isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else "error"
        body = error_body(code, str(exc.detail))
    else:  # pragma: no cover - DRF only handles APIException subclasses
        body = error_body("error", str(exc))
    response.data = body
    return response


def api_not_found(request: Any, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(
        error_body("not_found", f"no API endpoint at {request.path}"),
        status=status.HTTP_404_NOT_FOUND,
    )
