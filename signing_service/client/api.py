"""A small HTTP client for the signing service's REST API v1, on urllib only.

Guarantees:

* every failure is a :class:`ClientError` carrying the server's message when it sent the
  JSON error shape ``{"error": {"code", "message", "details"}}``;
* connection errors and 502/503/504 are retried a few times with exponential backoff
  (honouring ``Retry-After``); a retried POST re-sends the same ``Idempotency-Key``, so
  the server creates one request at most;
* the bearer token is only ever sent to the configured server: links to another origin
  and HTTP redirects are refused (urllib would forward the Authorization header to any
  host it is redirected to), and the token never appears in an error message.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from email.message import Message
from typing import Any
from urllib.parse import urljoin, urlsplit

__all__ = ["ClientError", "ServiceClient"]

USER_AGENT = "modelsign/0.1"
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 0.5  # seconds; doubled on each retry
MAX_RETRY_AFTER = 30.0
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_RESPONSE_BYTES = 64 << 20
SIGNING_REQUESTS_PATH = "api/v1/signing-requests/"
OCI_SIGNING_REQUESTS_PATH = "api/v1/oci-signing-requests/"
KEYS_PATH = "api/v1/keys/"
VERIFY_PATH = "api/v1/verify/"
BUNDLE_ACCEPT = "application/vnd.dev.sigstore.bundle.v0.3+json, application/json"


class ClientError(Exception):
    """A request failed; ``str()`` is a message for people, the rest is for code."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError for the 3xx, handled below


class ServiceClient:
    """Talks to one signing service. ``token`` is optional for public endpoints; it may be
    a callable (asked before every request) for CI ID tokens that must be renewed."""

    def __init__(
        self,
        server_url: str,
        token: str | Callable[[], str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(server_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"server URL must be http(s)://host[:port], got {server_url!r}")
        self.base = server_url.rstrip("/") + "/"
        self._origin = _origin(self.base)
        self._token = token
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = DEFAULT_BACKOFF if backoff is None else backoff
        self._sleep = sleep
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:  # never shows the token
        return f"ServiceClient({self.base!r})"

    # --- endpoints ---------------------------------------------------------------------

    def submit(
        self,
        body: Mapping[str, Any],
        idempotency_key: str,
        identity_token: str | None = None,
        path: str = SIGNING_REQUESTS_PATH,
    ) -> dict[str, Any]:
        """POST a signing request; returns the request (201 new, 200 replayed).

        ``identity_token``: for keyless authorities, the job's OIDC token for Fulcio.
        """
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Idempotency-Key": idempotency_key, "Content-Type": "application/json"}
        if identity_token:
            headers["Sigstore-Identity-Token"] = identity_token
        raw = self._request("POST", self.url(path), data=data, headers=headers)
        return _json_object(raw, "signing request")

    def get(self, url: str) -> dict[str, Any]:
        """GET a JSON object from a URL (absolute on this server, or relative to it)."""
        return _json_object(self._request("GET", self.url(url)), url)

    def bundle(self, url: str) -> bytes:
        """GET a signature bundle, as the exact bytes the server sent."""
        return self._request("GET", self.url(url), accept=BUNDLE_ACCEPT)

    def verify(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST to the deployment gate; returns the verdict ``{verdict, deployment, mode,
        checks}``. Retried like any request: verifying twice changes nothing."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        raw = self._request("POST", self.url(VERIFY_PATH), data=data, headers=headers)
        return _json_object(raw, "verify")

    def keys(self) -> list[dict[str, Any]]:
        """Every public key the server publishes (follows pagination)."""
        keys: list[dict[str, Any]] = []
        url: str | None = KEYS_PATH
        for _ in range(100):
            if not url:
                return keys
            page = self.get(url)
            results = page.get("results")
            if not isinstance(results, list):
                raise ClientError("the server's key list has no 'results' list")
            keys.extend(r for r in results if isinstance(r, dict))
            nxt = page.get("next")
            url = nxt if isinstance(nxt, str) else None
        raise ClientError("the server's key list has too many pages")

    def url(self, path_or_url: str) -> str:
        """Resolve against the server URL; refuse anything on another origin."""
        full = urljoin(self.base, path_or_url)
        if _origin(full) != self._origin:
            raise ClientError(f"refusing to follow a link to another server: {full}")
        return full

    # --- transport ---------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        accept: str = "application/json",
    ) -> bytes:
        all_headers = {"Accept": accept, "User-Agent": USER_AGENT, **(headers or {})}
        token = self._token() if callable(self._token) else self._token
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        attempt = 0
        while True:
            # S310: url() allows only this server's http(s) origin.
            req = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return _read_limited(resp, url)
            except urllib.error.HTTPError as err:
                retry = err.code in RETRY_STATUSES and attempt < self.retries
                delay = _retry_after(err.headers)
                if not retry:
                    raise _http_error(err, url) from None
                err.close()
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                if _not_retryable(err) or attempt >= self.retries:
                    raise ClientError(f"cannot reach {url}: {_reason(err)}") from None
                delay = None
            self._sleep(delay if delay is not None else self.backoff * 2**attempt)
            attempt += 1


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _read_limited(resp: Any, url: str) -> bytes:
    body: bytes = resp.read(MAX_RESPONSE_BYTES + 1)
    if len(body) > MAX_RESPONSE_BYTES:
        raise ClientError(f"response from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    return body


def _retry_after(headers: Message | None) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER) if value else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


def _not_retryable(err: BaseException) -> bool:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    # A certificate or protocol problem will not go away by asking again.
    return isinstance(reason, ssl.SSLError | ValueError)


def _reason(err: BaseException) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    return str(reason) or type(reason).__name__


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ClientError(f"the server's answer for {what} is not JSON") from None
    if not isinstance(data, dict):
        raise ClientError(f"the server's answer for {what} is not a JSON object")
    return data


def _http_error(err: urllib.error.HTTPError, url: str) -> ClientError:
    status = err.code
    if 300 <= status < 400:
        where = err.headers.get("Location", "?") if err.headers else "?"
        return ClientError(
            f"the server redirected {url} to {where}; use the final URL as --server",
            status=status,
        )
    try:
        body = err.read(1 << 20)
    except OSError:
        body = b""
    finally:
        err.close()
    code, message, details = _error_fields(body)
    if message is None:
        text = _printable(body.decode("utf-8", "replace"))[:200]
        message = f"HTTP {status} {err.reason} from {url}" + (f": {text}" if text else "")
    else:
        message = _printable(message) + f" (HTTP {status}" + (f", {code})" if code else ")")
        if details not in (None, "", [], {}):
            extra = json.dumps(details, ensure_ascii=False)
            message += f"; details: {_printable(extra)[:500]}"
    return ClientError(message, status=status, code=code, details=details)


def _error_fields(body: bytes) -> tuple[str | None, str | None, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None, None, None
    code = error.get("code")
    return (code if isinstance(code, str) else None), error["message"], error.get("details")


def _printable(text: str) -> str:
    # A proxy's HTML error page should not mess up the terminal.
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
