"""The CI job's OIDC ID token for ``modelsign sign --oidc``, read the way each CI provides it.

* a file (``--oidc-token-file``), for any CI that writes one;
* an environment variable (``--oidc-token-env``, default ``MODELSIGN_ID_TOKEN``): GitLab CI
  puts the token there when the job declares ``id_tokens: MODELSIGN_ID_TOKEN: aud: ...``;
* GitHub Actions: requested from ``ACTIONS_ID_TOKEN_REQUEST_URL`` with ``&audience=`` and
  the ``ACTIONS_ID_TOKEN_REQUEST_TOKEN`` bearer (the job needs ``permissions: id-token:
  write``). A fresh token is requested whenever the current one is about to expire, so a
  long wait for approval keeps polling with a valid token.

Imports no Django. The token is never printed; errors name what is missing and how to fix
it in the CI's own terms.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["DEFAULT_TOKEN_ENV", "CiTokenError", "github_token", "token_source"]

DEFAULT_TOKEN_ENV = "MODELSIGN_ID_TOKEN"  # noqa: S105 - a variable name
REFRESH_BEFORE_EXPIRY = 60.0  # seconds: ask GitHub for a new token this long before exp
_MAX_RESPONSE = 64 * 1024


class CiTokenError(Exception):
    """No usable CI ID token; the message says what to change in the CI configuration."""


def token_source(
    *,
    audience: str,
    env: Mapping[str, str],
    token_env: str = DEFAULT_TOKEN_ENV,
    token_file: str | None = None,
) -> Callable[[], str]:
    """A callable returning the job's ID token (the same one, or a fresh one when needed)."""
    if token_file:
        return _static(_read_file(token_file), f"--oidc-token-file {token_file}")
    if env.get(token_env):
        return _static(env[token_env].strip(), f"${token_env}")
    if env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
        return _GitHubTokens(audience, env)
    if env.get("GITHUB_ACTIONS") == "true":
        raise CiTokenError(
            "GitHub Actions gave this job no ID token (ACTIONS_ID_TOKEN_REQUEST_URL is not "
            "set): add `permissions: id-token: write` to the job"
        )
    if env.get("GITLAB_CI") == "true":
        raise CiTokenError(
            f"GitLab CI: ${token_env} is not set: declare it in the job with "
            f"`id_tokens: {token_env}: aud: {audience}`"
        )
    raise CiTokenError(
        "--oidc: no CI ID token here: run in GitHub Actions (with `permissions: id-token: "
        f"write`) or GitLab CI (with `id_tokens: {token_env}`), or pass --oidc-token-file"
    )


def _static(token: str, where: str) -> Callable[[], str]:
    if token.count(".") != 2:
        raise CiTokenError(f"{where} does not hold a JWT (header.payload.signature)")
    return lambda: token


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CiTokenError(f"cannot read --oidc-token-file {path}: {exc.strerror}") from None


class _GitHubTokens:
    """Fetches GitHub Actions ID tokens for one audience, reusing one until it nearly expires."""

    def __init__(self, audience: str, env: Mapping[str, str]) -> None:
        self.audience = audience
        self.url = env["ACTIONS_ID_TOKEN_REQUEST_URL"]
        self._bearer = env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"]
        self._token = ""
        self._expires = 0.0
        self._lock = threading.Lock()
        _check_url(self.url)
        self()  # fail now, before hashing the model, if no token can be had

    def __call__(self) -> str:
        with self._lock:
            if not self._token or time.time() > self._expires - REFRESH_BEFORE_EXPIRY:
                self._token = github_token(self.url, self._bearer, self.audience)
                self._expires = _expiry(self._token)
            return self._token


def github_token(
    request_url: str, request_token: str, audience: str, *, timeout: float = 30.0, tries: int = 3
) -> str:
    """One ID token from GitHub's token endpoint for ``audience``."""
    sep = "&" if "?" in request_url else "?"
    url = f"{request_url}{sep}audience={quote(audience, safe='')}"
    headers = {"Authorization": f"bearer {request_token}", "Accept": "application/json"}
    for attempt in range(tries):
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - checked https/loopback
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
                return _token_from(resp.read(_MAX_RESPONSE + 1))
        except urllib.error.HTTPError as err:
            err.close()
            if err.code < 500 or attempt == tries - 1:
                raise CiTokenError(
                    f"GitHub's ID token endpoint answered HTTP {err.code}"
                    + (
                        ": does the job have `permissions: id-token: write`?"
                        if err.code in (401, 403)
                        else ""
                    )
                ) from None
        except (urllib.error.URLError, OSError) as err:
            if attempt == tries - 1:
                reason = getattr(err, "reason", err)
                raise CiTokenError(f"cannot reach GitHub's ID token endpoint: {reason}") from None
        time.sleep(0.5 * 2**attempt)
    raise CiTokenError("GitHub's ID token endpoint gave no token")  # pragma: no cover


def _token_from(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise CiTokenError("GitHub's ID token endpoint did not answer JSON") from None
    value = data.get("value") if isinstance(data, dict) else None
    if not isinstance(value, str) or value.count(".") != 2:
        raise CiTokenError("GitHub's ID token endpoint answered without a token 'value'")
    return value


def _expiry(token: str) -> float:
    """``exp`` read without verifying (only to know when to ask again); 0 if unreadable."""
    part = token.split(".")[1]
    try:
        claims: Any = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error):
        return 0.0
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else 0.0


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise CiTokenError(f"ACTIONS_ID_TOKEN_REQUEST_URL must be https, got {parts.scheme}://")
