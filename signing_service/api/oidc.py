"""CI authentication by OIDC ID token: ``Authorization: Bearer <JWT from the CI provider>``.

Placed before :class:`~signing_service.api.auth.ApiTokenAuthentication`: a bearer value
that looks like a JWT is handled (and refused or accepted) here; anything else, such as
an ``mst_`` API token, is left to the next class. The checks are in
:mod:`signing_service.oidc`; this class maps them to the API and records the outcome.

A token is spent by the first request that changes something (POST and friends); reads
with it (polling the request, fetching the bundle) are allowed until it expires, and only
ever show the identity's own requests.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request

from signing_service import oidc
from signing_service.oidc_config import current_oidc_config
from signing_service.policy import current_policy
from signing_service.signing import Principal

log = logging.getLogger("signing_service.oidc")


class ServiceUnavailable(exceptions.APIException):
    status_code = 503
    default_code = "unavailable"
    default_detail = "a service the check needs is unavailable"


class OidcAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        token = token.strip()
        if scheme != self.keyword or not oidc.looks_like_jwt(token):
            return None
        try:
            return self._authenticate(request, token), None
        except oidc.OidcError as exc:
            _log_refusal(request, exc)
            raise _api_error(exc) from None

    def _authenticate(self, request: Request, token: str) -> Principal:
        config = current_oidc_config()
        if not config.issuers:
            raise oidc.OidcRefused(
                "oidc_not_configured",
                "this service accepts no OIDC tokens (no OIDC_CONFIG_FILE); use an API token",
            )
        verified = oidc.verify_token(token, config)
        if request.method not in SAFE_METHODS:
            oidc.spend_jti(verified, settings.OIDC_REDIS_URL, _fingerprint(request))
        scope = verified.config.authorities
        log.info(
            "oidc: %s %s as %r (issuer %s, jti %s, actor %r)",
            request.method, request.path, verified.identity, verified.config.name,
            verified.credential.jti, verified.actor,
        )  # fmt: skip
        return Principal(
            identity=verified.identity,
            # Which of these it may sign for is decided by the policy's authorized_signers.
            authorities=frozenset(current_policy().authorities) if scope is None else scope,
            actor=verified.actor,
            oidc=verified.credential,
        )

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="modelsign"'


def _fingerprint(request: Request) -> str:
    """Idempotency-Key and body digest: what makes a retry "the same request"; '' if none."""
    key = request.META.get("HTTP_IDEMPOTENCY_KEY", "")
    if not key:
        return ""
    try:
        body = request._request.body  # read once by Django, still there for the parser
    except RequestDataTooBig:
        return ""  # the parser answers 413
    return hashlib.sha256(key.encode() + b"\0" + hashlib.sha256(body).digest()).hexdigest()


def _api_error(exc: oidc.OidcError) -> exceptions.APIException:
    if isinstance(exc, oidc.OidcUnavailable):
        return ServiceUnavailable(exc.message, exc.code)
    if isinstance(exc, oidc.OidcForbidden):
        return exceptions.PermissionDenied(exc.message, exc.code)
    return exceptions.AuthenticationFailed(exc.message, exc.code)


def _log_refusal(request: Request, exc: oidc.OidcError) -> None:
    level = logging.ERROR if isinstance(exc, oidc.OidcUnavailable) else logging.WARNING
    log.log(
        level, "oidc: refused %s %s from %s: %s (%s)",
        request.method, request.path, request.META.get("REMOTE_ADDR", "?"), exc.message, exc.code,
    )  # fmt: skip


class OidcScheme(OpenApiAuthenticationExtension):
    target_class = "signing_service.api.oidc.OidcAuthentication"
    name = "CiOidcToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "The CI job's OIDC ID token (GitHub Actions, GitLab id_tokens)",
        }
