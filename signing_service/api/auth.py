"""CI authentication by API token: ``Authorization: Bearer mst_...``."""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from signing_service.models import ApiToken
from signing_service.signing import Principal


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Principal, ApiToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme != self.keyword or not token.strip():
            raise exceptions.AuthenticationFailed("use 'Authorization: Bearer <api token>'")
        row = ApiToken.objects.find_usable(token.strip())
        if row is None:
            # One message for unknown, revoked and expired: do not tell an attacker which.
            raise exceptions.AuthenticationFailed("the API token is unknown, revoked or expired")
        now = timezone.now()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        principal = Principal(
            identity=row.identity, authorities=frozenset(row.authorities), token=row
        )
        return principal, row

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="modelsign"'


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "signing_service.api.auth.ApiTokenAuthentication"
    name = "ApiToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "API token from create_api_token",
        }
