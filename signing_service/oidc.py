"""Verifying CI OIDC ID tokens (GitHub Actions, GitLab, any configured issuer).

What :func:`verify_token` guarantees when it returns, and refuses otherwise with an
:class:`OidcError` whose message names the reason (never the token):

* the header was read without trusting it: ``alg`` is RS256 or ES256, ``kid`` is present,
  ``jku``/``jwk``/``x5u``/``x5c``/``crit`` are absent;
* ``iss`` is a configured issuer (exact match), and the signature verifies with the key of
  that ``kid`` from that issuer's JWKS, fetched from its discovery document on the issuer's
  own origin (pinned: no redirect, no other host), cached, and refetched on an unknown
  ``kid`` at most once per ``jwks_refresh_min_seconds``;
* the key type matches the algorithm (an RSA key never verifies ES256, an EC key never
  RS256, and no HMAC algorithm is ever used);
* ``aud`` is exactly the issuer's configured audience; ``exp``, ``iat`` (and ``nbf`` when
  present) hold with at most ``leeway_seconds`` of skew; ``exp - iat`` is at most the
  issuer's ``max_token_lifetime_seconds``; ``jti`` is present;
* the issuer's rules hold: the owner/repository ids are the pinned ones, the run was not
  triggered by a pull/merge request (unless allowed), the repository matches
  ``allowed_repositories``, ``required_claims`` match;
* the identity is the issuer's template filled with claim values that cannot imitate the
  template's separators.

:func:`spend_jti` then makes the token single use (Redis ``SET NX EX`` until it expires).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from signing_service.oidc_config import MAX_LEEWAY_SECONDS, IssuerConfig, OidcConfig

__all__ = [
    "ALGORITHMS",
    "OidcCredential",
    "OidcError",
    "OidcForbidden",
    "OidcRefused",
    "OidcUnavailable",
    "VerifiedToken",
    "looks_like_jwt",
    "spend_jti",
    "verify_token",
]

log = logging.getLogger(__name__)

#: The only signature algorithms accepted, and the JWK key type each needs.
ALGORITHMS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "ES256": ("EC", "P-256"),
}
#: Header parameters that would let the token choose its own key or semantics.
REFUSED_HEADERS = ("jku", "jwk", "x5u", "x5c", "crit")
MAX_TOKEN_BYTES = 16 * 1024
MAX_DOCUMENT_BYTES = 512 * 1024
#: Monotonic seconds for the JWKS cache's ages (a name tests can replace).
_clock = time.monotonic
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class OidcError(Exception):
    """A token is refused; ``code`` and ``status`` map to the API's error shape."""

    status = 401

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class OidcRefused(OidcError):
    """The token is not a valid token for this service (401)."""


class OidcForbidden(OidcError):
    """The token is valid, but the issuer's rules refuse the run it stands for (403)."""

    status = 403


class OidcUnavailable(OidcError):
    """Something the check needs (issuer keys, the replay store) cannot be reached (503)."""

    status = 503


@dataclass(frozen=True)
class OidcCredential:
    """How a :class:`~signing_service.signing.Principal` authenticated with a CI token."""

    issuer: str
    issuer_name: str
    subject: str
    jti: str
    #: Verified CI provenance (repository, commit, ref, actor), as (field, value) pairs.
    ci: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VerifiedToken:
    config: IssuerConfig
    claims: Mapping[str, Any]
    identity: str
    actor: str
    credential: OidcCredential
    expires_at: int


def looks_like_jwt(token: str) -> bool:
    """Three non-empty base64url parts: a JWS compact token (API tokens start ``mst_``)."""
    parts = token.split(".")
    return (
        len(parts) == 3
        and not token.startswith("mst_")
        and all(p and set(p) <= _B64URL for p in parts[:2])
        and set(parts[2]) <= _B64URL
    )


# --- the check -------------------------------------------------------------------------


def verify_token(token: str, config: OidcConfig, *, now: float | None = None) -> VerifiedToken:
    """Verify ``token`` completely (signature, times, audience, issuer rules); see module doc."""
    if len(token) > MAX_TOKEN_BYTES:
        raise OidcRefused("oidc_malformed", f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    header, unverified = _decode_unverified(token)
    alg, kid = _check_header(header)
    iss = unverified.get("iss")
    issuer = config.issuer(iss) if isinstance(iss, str) else None
    if issuer is None:
        raise OidcRefused("oidc_unknown_issuer", f"issuer {_show(iss)} is not a configured issuer")
    key = _JWKS.key(issuer, kid, alg, config)
    claims = _verify_signature(token, key, alg, issuer)
    now = time.time() if now is None else now
    expires_at = _check_times(claims, issuer, config.leeway_seconds, now)
    _check_audience(claims, issuer)
    jti = _required_string(claims, "jti", issuer)
    _check_rules(claims, issuer)
    identity = render_identity(issuer, claims)
    actor = _claim_text(claims, issuer.actor_claim) if issuer.actor_claim else ""
    credential = OidcCredential(
        issuer=issuer.issuer,
        issuer_name=issuer.name,
        subject=_claim_text(claims, "sub"),
        jti=jti,
        ci=_provenance(claims, issuer, actor),
    )
    return VerifiedToken(issuer, claims, identity, actor, credential, expires_at)


def _decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not looks_like_jwt(token):
        raise OidcRefused("oidc_malformed", "the token is not a signed JWT (header.payload.sig)")
    head, body, _sig = token.split(".")
    return _json_part(head, "header"), _json_part(body, "payload")


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise OidcRefused("oidc_malformed", f"the token's {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise OidcRefused("oidc_malformed", f"the token's {what} is not a JSON object")
    return value


def _check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise OidcRefused(
            "oidc_algorithm_refused", f"alg {_show(alg)} is refused; only RS256 and ES256"
        )
    for name in REFUSED_HEADERS:
        if name in header:
            raise OidcRefused(
                "oidc_header_refused",
                f"header parameter {name!r} is refused: keys come from the issuer's JWKS only",
            )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise OidcRefused("oidc_header_refused", "the token's header has no usable 'kid'")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise OidcRefused("oidc_header_refused", f"typ {_show(typ)} is not JWT")
    return str(alg), kid


def _verify_signature(token: str, key: Any, alg: str, issuer: IssuerConfig) -> dict[str, Any]:
    import jwt

    jws = jwt.PyJWS(algorithms=list(ALGORITHMS))
    try:
        decoded = jws.decode_complete(
            token, key=key, algorithms=[alg], options={"enforce_minimum_key_length": True}
        )
    except jwt.InvalidKeyError as exc:  # e.g. an RSA key under 2048 bits
        raise OidcRefused(
            "oidc_algorithm_refused", f"{issuer.name}'s key is refused: {exc}"
        ) from None
    except jwt.InvalidSignatureError:
        raise OidcRefused(
            "oidc_bad_signature", f"the signature does not verify with {issuer.name}'s key"
        ) from None
    except jwt.PyJWTError as exc:
        raise OidcRefused("oidc_bad_signature", f"the token cannot be verified: {exc}") from None
    return _json_object(decoded["payload"])


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        raise OidcRefused("oidc_malformed", "the token's payload is not JSON") from None
    if not isinstance(value, dict):
        raise OidcRefused("oidc_malformed", "the token's payload is not a JSON object")
    return value


def _check_times(claims: Mapping[str, Any], issuer: IssuerConfig, leeway: int, now: float) -> int:
    exp, iat = _number(claims, "exp"), _number(claims, "iat")
    nbf = _number(claims, "nbf") if "nbf" in claims else None
    if now > exp + leeway:
        raise OidcRefused("oidc_expired", f"the token expired {int(now - exp)} s ago")
    if nbf is not None and now + leeway < nbf:
        raise OidcRefused("oidc_not_yet_valid", f"the token is not valid for {int(nbf - now)} s")
    if now + leeway < iat:
        raise OidcRefused("oidc_issued_in_future", f"the token is issued {int(iat - now)} s ahead")
    lifetime = exp - iat
    if lifetime > issuer.max_token_lifetime_seconds:
        raise OidcRefused(
            "oidc_lifetime_too_long",
            f"the token lives {int(lifetime)} s; {issuer.name} tokens may live at most "
            f"{issuer.max_token_lifetime_seconds} s",
        )
    return int(exp)


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OidcRefused("oidc_claim_missing", f"the token has no numeric {name!r} claim")
    return float(value)


def _check_audience(claims: Mapping[str, Any], issuer: IssuerConfig) -> None:
    aud = claims.get("aud")
    if isinstance(aud, list) and len(aud) == 1:
        aud = aud[0]
    if aud != issuer.audience:
        raise OidcRefused(
            "oidc_wrong_audience",
            f"aud {_show(aud)} is not this service's audience {issuer.audience!r}",
        )


def _required_string(claims: Mapping[str, Any], name: str, issuer: IssuerConfig) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise OidcRefused("oidc_claim_missing", f"{issuer.name} token has no usable {name!r}")
    return value


# --- issuer rules ----------------------------------------------------------------------


def _check_rules(claims: Mapping[str, Any], issuer: IssuerConfig) -> None:
    kind = issuer.claims
    repo = _claim_text(claims, issuer.repository_claim) if issuer.repository_claim else ""
    if issuer.refuse_pull_requests and kind.trigger_claim:
        trigger = _claim_text(claims, kind.trigger_claim)
        if trigger in kind.pull_request_triggers:
            raise OidcForbidden(
                "oidc_pull_request_refused",
                f"{kind.trigger_claim}={trigger!r} runs are refused for {issuer.name}: "
                "a pull or merge request may run code from a fork",
            )
    _check_pinned(claims, kind.owner_id_claim, issuer.repository_owner_ids, repo, "owner")
    _check_pinned(claims, kind.repository_id_claim, issuer.repository_ids, repo, "repository")
    if issuer.allowed_repositories and not any(
        fnmatchcase(repo, pattern) for pattern in issuer.allowed_repositories
    ):
        raise OidcForbidden(
            "oidc_repository_not_allowed",
            f"repository {repo!r} is not in {issuer.name}'s allowed_repositories",
        )
    for name, accepted in issuer.required_claims.items():
        value = _claim_text(claims, name)
        if value not in accepted:
            raise OidcForbidden(
                "oidc_claim_not_allowed",
                f"claim {name}={value!r} is not one of {sorted(accepted)}",
            )


def _check_pinned(
    claims: Mapping[str, Any], claim: str | None, pinned: frozenset[str], repo: str, what: str
) -> None:
    if not pinned or claim is None:
        return
    value = _claim_text(claims, claim)
    if value not in pinned:
        raise OidcForbidden(
            f"oidc_{what}_not_pinned",
            f"{claim} {value!r} of {repo or 'the repository'!r} is not a pinned {what} id "
            "(a fork or a re-registered name has a different id)",
        )


def render_identity(issuer: IssuerConfig, claims: Mapping[str, Any]) -> str:
    """The issuer's identity template filled with the token's claims."""
    template = issuer.identity
    values: dict[str, str] = {}
    for name in template.claims:
        value = _claim_text(claims, name)
        if not value:
            raise OidcForbidden(
                "oidc_identity_claim_missing",
                f"the token has no {name!r} claim, which the identity {template.text!r} needs",
            )
        bad = sorted(template.separators & set(value))
        if bad or not _printable(value):
            raise OidcForbidden(
                "oidc_identity_claim_invalid",
                f"claim {name}={value!r} contains {bad or 'control characters'}, "
                f"which would blur the identity {template.text!r}",
            )
        values[name] = value
    identity = template.text.format(**values)
    if len(identity) > 320:
        raise OidcForbidden("oidc_identity_claim_invalid", "the identity is over 320 characters")
    return identity


def _claim_text(claims: Mapping[str, Any], name: str | None) -> str:
    """A claim as text: strings as they are, whole numbers as digits, anything else ''."""
    value = claims.get(name) if name else None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _printable(value: str) -> bool:
    return all(unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp") for ch in value)


def _provenance(
    claims: Mapping[str, Any], issuer: IssuerConfig, actor: str
) -> tuple[tuple[str, str], ...]:
    kind = issuer.claims
    fields = {
        "repository": _claim_text(claims, issuer.repository_claim),
        "commit": _claim_text(claims, kind.commit_claim),
        "ref": _claim_text(claims, kind.ref_claim),
        "actor": actor,
    }
    return tuple(
        (k, v)
        for k, v in fields.items()
        if v and len(v) <= 255 and _printable(v) and v == v.strip()
    )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- issuer keys -----------------------------------------------------------------------


@dataclass
class _Keys:
    keys: list[dict[str, Any]]
    fetched_at: float


class JwksCache:
    """Each issuer's JWKS, fetched from the issuer's own origin, kept ``jwks_cache_seconds``.

    One lock per issuer: fetches are minutes apart, and holding the lock while one runs
    turns a burst of tokens with an unknown ``kid`` into a single fetch. A failed fetch is
    not retried for ``jwks_refresh_min_seconds`` (requests fail fast meanwhile), and stale
    keys are never used after a failure: an issuer that drops a key must be obeyed.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Keys] = {}
        self._failures: dict[str, tuple[float, OidcError]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()
            self._failures.clear()

    def _lock(self, issuer: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(issuer, threading.Lock())

    def key(self, issuer: IssuerConfig, kid: str, alg: str, config: OidcConfig) -> Any:
        """The PyJWK for ``kid``, checked against ``alg``; refreshes once on an unknown kid."""
        with self._lock(issuer.issuer):
            entry = self._entries.get(issuer.issuer)
            age = _clock() - entry.fetched_at if entry else float("inf")
            stale = age > config.jwks_cache_seconds
            unknown = entry is not None and not _with_kid(entry.keys, kid)
            if entry is None or stale or (unknown and age >= config.jwks_refresh_min_seconds):
                entry = self._refresh(issuer, config)
        candidates = _with_kid(entry.keys, kid)
        if not candidates:
            raise OidcRefused(
                "oidc_unknown_key", f"{issuer.name}'s JWKS has no key with kid {kid!r}"
            )
        if len(candidates) > 1:
            raise OidcRefused("oidc_unknown_key", f"{issuer.name}'s JWKS lists kid {kid!r} twice")
        return _jwk_for(candidates[0], alg, kid)

    def _refresh(self, issuer: IssuerConfig, config: OidcConfig) -> _Keys:
        failed = self._failures.get(issuer.issuer)
        if failed and _clock() - failed[0] < config.jwks_refresh_min_seconds:
            raise failed[1]
        self._entries.pop(issuer.issuer, None)
        try:
            keys = _fetch_jwks(issuer, config.http_timeout_seconds)
        except OidcError as exc:
            self._failures[issuer.issuer] = (_clock(), exc)
            log.error("oidc: cannot use the keys of issuer %s: %s", issuer.issuer, exc.message)
            raise
        self._failures.pop(issuer.issuer, None)
        entry = self._entries[issuer.issuer] = _Keys(keys, _clock())
        log.info("oidc: fetched %d keys of issuer %s", len(keys), issuer.issuer)
        return entry


def _with_kid(keys: list[dict[str, Any]], kid: str) -> list[dict[str, Any]]:
    return [k for k in keys if k.get("kid") == kid]


def _jwk_for(jwk: Mapping[str, Any], alg: str, kid: str) -> Any:
    from jwt import PyJWK, PyJWKError

    kty, crv = ALGORITHMS[alg]
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
        raise OidcRefused(
            "oidc_algorithm_refused",
            f"alg {alg} needs a {kty}{' ' + crv if crv else ''} key, but key {kid!r} is "
            f"{jwk.get('kty')!r}{' ' + str(jwk.get('crv')) if jwk.get('crv') else ''}",
        )
    if jwk.get("alg") not in (None, alg) or jwk.get("use") not in (None, "sig"):
        raise OidcRefused("oidc_algorithm_refused", f"key {kid!r} is not for {alg} signatures")
    try:
        return PyJWK(dict(jwk), algorithm=alg)
    except PyJWKError as exc:
        raise OidcRefused("oidc_unknown_key", f"key {kid!r} is unusable: {exc}") from None


def _fetch_jwks(issuer: IssuerConfig, timeout: float) -> list[dict[str, Any]]:
    discovery_url = issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
    discovery = _get_json(discovery_url, timeout)
    if discovery.get("issuer") != issuer.issuer:
        raise OidcRefused(
            "oidc_jwks_refused",
            f"{discovery_url} names issuer {_show(discovery.get('issuer'))}, not {issuer.issuer!r}",
        )
    jwks_uri = discovery.get("jwks_uri")
    if not isinstance(jwks_uri, str) or _origin(jwks_uri) != _origin(issuer.issuer):
        # The issuer's keys must come from the issuer's own origin: a discovery document
        # that points elsewhere could hand us anybody's keys.
        raise OidcRefused(
            "oidc_jwks_refused",
            f"{issuer.name}'s jwks_uri {_show(jwks_uri)} is not on the issuer's origin "
            f"{'://'.join(map(str, _origin(issuer.issuer)[:2]))}",
        )
    keys = _get_json(jwks_uri, timeout).get("keys")
    if not isinstance(keys, list):
        raise OidcUnavailable("oidc_jwks_unavailable", f"{jwks_uri} has no 'keys' list")
    return [k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)]


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could leave the issuer's origin: refuse it


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as resp:
            body = resp.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as err:
        err.close()
        raise OidcUnavailable("oidc_jwks_unavailable", f"{url} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise OidcUnavailable("oidc_jwks_unavailable", f"cannot fetch {url}: {reason}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise OidcUnavailable("oidc_jwks_unavailable", f"{url} is over {MAX_DOCUMENT_BYTES} bytes")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise OidcUnavailable("oidc_jwks_unavailable", f"{url} did not return JSON") from None
    if not isinstance(value, dict):
        raise OidcUnavailable("oidc_jwks_unavailable", f"{url} did not return a JSON object")
    return value


_JWKS = JwksCache()


def reset() -> None:
    """Forget cached issuer keys (tests; a changed configuration)."""
    _JWKS.clear()


# --- single use ------------------------------------------------------------------------


def spend_jti(
    token: VerifiedToken, redis_url: str, fingerprint: str, *, now: float | None = None
) -> None:
    """Record the token's ``jti`` as used until the token expires; refuse a second use.

    ``fingerprint`` identifies the request that spends it (Idempotency-Key and body). The
    same token may come back with the same non-empty fingerprint: that is the client
    retrying the very same request after a lost answer, and the Idempotency-Key returns the
    first result. Anything else is a replay. If Redis cannot be reached the token is
    refused (503), never accepted unchecked.
    """
    import redis

    now = time.time() if now is None else now
    # Kept past exp plus the largest leeway, so the jti is remembered as long as it verifies.
    ttl = max(1, int(token.expires_at - now) + MAX_LEEWAY_SECONDS + 1)
    digest = hashlib.sha256(f"{token.config.issuer}\n{token.credential.jti}".encode()).hexdigest()
    key = f"modelsign:oidc:jti:{digest}"
    try:
        client = _redis(redis_url)
        if client.set(key, fingerprint or "-", nx=True, ex=ttl):
            return
        first = client.get(key)
    except redis.RedisError as exc:
        raise OidcUnavailable(
            "oidc_replay_check_unavailable",
            f"cannot check the token for replay (Redis: {type(exc).__name__}); "
            "refusing rather than risk accepting a replayed token",
        ) from None
    if fingerprint and first == fingerprint.encode():
        log.info("oidc: jti %s came back with the same request", token.credential.jti)
        return
    raise OidcRefused(
        "oidc_replayed",
        f"this token (jti {token.credential.jti!r}) was already used; a CI token creates one "
        "request: fetch a new one",
    )


_redis_clients: dict[str, Any] = {}
_redis_lock = threading.Lock()


def _redis(url: str) -> Any:
    import redis

    with _redis_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            _redis_clients[url] = client
        return client
