"""The CI OIDC configuration file (``OIDC_CONFIG_FILE``): which issuers are trusted, for what.

Loaded once and validated strictly at start-up, like the policy file: unknown fields are
errors, and every error names the field path. No file (the default) means OIDC
authentication is off and only API tokens authenticate. The format, with every field::

    oidc:
      leeway_seconds: 60                 # clock skew allowed on exp/nbf/iat (0-60)
      max_token_lifetime_seconds: 3600   # exp - iat above this is refused (per issuer too)
      jwks_cache_seconds: 600            # how long an issuer's JWKS is used before refetching
      jwks_refresh_min_seconds: 60       # an unknown kid refetches at most this often
      http_timeout_seconds: 5            # discovery and JWKS fetches
      require_oidc: [production]         # these authorities refuse API tokens
      issuers:
        github:                          # a name for messages and logs
          kind: github                   # github | gitlab | generic: claim names and defaults
          issuer: https://token.actions.githubusercontent.com    # exact `iss`
          audience: https://sign.example.com                     # exact `aud`
          identity: "repo:{repository}:environment:{environment}"
          repository_owner_ids: ["1342004"]      # pinned: forks have another owner id
          repository_ids: ["98765"]              # optional, pins single repositories
          allowed_repositories: ["acme/*"]       # optional globs on the repository claim
          refuse_pull_requests: true             # default for github/gitlab
          required_claims: {runner_environment: [github-hosted]}
          authorities: [staging, production]     # optional: default every authority
          max_token_lifetime_seconds: 900

The identity a token stands for is ``identity`` with each ``{claim}`` replaced by the
token's claim; it is what the policy's ``authorized_signers`` are matched against.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from signing_service.policy import Policy

__all__ = [
    "KINDS",
    "IdentityTemplate",
    "IssuerConfig",
    "Kind",
    "OidcConfig",
    "OidcConfigError",
    "current_oidc_config",
    "load_oidc_config",
    "parse_oidc_config",
]

MAX_LEEWAY_SECONDS = 60
_ISSUER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class OidcConfigError(ValueError):
    """The OIDC configuration is invalid; the message names the field and the problem."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Kind:
    """Where a CI provider puts the facts the rules need (claim names), and its defaults."""

    actor_claim: str | None
    repository_claim: str | None
    owner_id_claim: str | None
    repository_id_claim: str | None
    commit_claim: str | None
    ref_claim: str | None
    #: The claim naming what triggered the run, and the values that mean "a pull/merge
    #: request": such runs may execute a fork's code, so they are refused by default.
    trigger_claim: str | None
    pull_request_triggers: tuple[str, ...]


KINDS: Mapping[str, Kind] = {
    "github": Kind(
        actor_claim="actor",
        repository_claim="repository",
        owner_id_claim="repository_owner_id",
        repository_id_claim="repository_id",
        commit_claim="sha",
        ref_claim="ref",
        trigger_claim="event_name",
        pull_request_triggers=("pull_request", "pull_request_target"),
    ),
    "gitlab": Kind(
        actor_claim="user_login",
        repository_claim="project_path",
        owner_id_claim="namespace_id",
        repository_id_claim="project_id",
        commit_claim="sha",
        ref_claim="ref",
        trigger_claim="pipeline_source",
        pull_request_triggers=("merge_request_event", "external_pull_request_event"),
    ),
    "generic": Kind(None, None, None, None, None, None, None, ()),
}


@dataclass(frozen=True)
class IdentityTemplate:
    """``repo:{repository}:ref:{ref}``: literal text and claim names, nothing else."""

    text: str
    claims: tuple[str, ...]
    #: The literal text's punctuation. A claim value may not contain any of it, so a value
    #: can never imitate the template's structure (a repository ``a:ref:refs/heads/main``).
    separators: frozenset[str]


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    kind: str
    issuer: str
    audience: str
    identity: IdentityTemplate
    actor_claim: str | None
    repository_claim: str | None
    allowed_repositories: tuple[str, ...]
    repository_owner_ids: frozenset[str]
    repository_ids: frozenset[str]
    refuse_pull_requests: bool
    required_claims: Mapping[str, frozenset[str]]
    #: Authorities tokens of this issuer may ask for; None means every authority.
    authorities: frozenset[str] | None
    max_token_lifetime_seconds: int

    @property
    def claims(self) -> Kind:
        return KINDS[self.kind]


@dataclass(frozen=True)
class OidcConfig:
    issuers: Mapping[str, IssuerConfig]  # by exact issuer URL
    require_oidc: frozenset[str]
    leeway_seconds: int
    jwks_cache_seconds: int
    jwks_refresh_min_seconds: int
    http_timeout_seconds: int

    def issuer(self, iss: str) -> IssuerConfig | None:
        return self.issuers.get(iss)


#: OIDC authentication off: no issuer is trusted and no authority requires OIDC.
DISABLED = OidcConfig({}, frozenset(), MAX_LEEWAY_SECONDS, 600, 60, 5)

_TOP_FIELDS = {
    "leeway_seconds",
    "max_token_lifetime_seconds",
    "jwks_cache_seconds",
    "jwks_refresh_min_seconds",
    "http_timeout_seconds",
    "require_oidc",
    "issuers",
}
_ISSUER_REQUIRED = {"issuer", "audience", "identity"}
_ISSUER_OPTIONAL = {
    "kind",
    "actor_claim",
    "repository_claim",
    "allowed_repositories",
    "repository_owner_ids",
    "repository_ids",
    "refuse_pull_requests",
    "required_claims",
    "authorities",
    "max_token_lifetime_seconds",
}


def load_oidc_config(path: Path, policy: Policy) -> OidcConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OidcConfigError("OIDC_CONFIG_FILE", f"cannot read {path}: {exc.strerror}") from None
    return parse_oidc_config(raw, policy)


def parse_oidc_config(raw: bytes, policy: Policy) -> OidcConfig:
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise OidcConfigError("(file)", f"not valid YAML: {exc}") from None
    root = _mapping(doc, "(file)", required={"oidc"}, optional=set())
    top = _mapping(root["oidc"], "oidc", required={"issuers"}, optional=_TOP_FIELDS)
    lifetime = _int(top, "max_token_lifetime_seconds", "oidc", 3600, 60, 86_400)
    issuers: dict[str, IssuerConfig] = {}
    for name, body in _mapping(top["issuers"], "oidc.issuers").items():
        if not isinstance(name, str) or not _ISSUER_NAME.fullmatch(name):
            raise OidcConfigError(f"oidc.issuers.{name}", "names are letters, digits, - and _")
        config = _issuer(name, body, f"oidc.issuers.{name}", policy, lifetime)
        if config.issuer in issuers:
            raise OidcConfigError(
                f"oidc.issuers.{name}.issuer",
                f"{config.issuer} is already configured as {issuers[config.issuer].name!r}",
            )
        issuers[config.issuer] = config
    if not issuers:
        raise OidcConfigError("oidc.issuers", "declares no issuer")
    return OidcConfig(
        issuers=issuers,
        require_oidc=_authorities(top.get("require_oidc", []), "oidc.require_oidc", policy),
        leeway_seconds=_int(top, "leeway_seconds", "oidc", 60, 0, MAX_LEEWAY_SECONDS),
        jwks_cache_seconds=_int(top, "jwks_cache_seconds", "oidc", 600, 10, 86_400),
        jwks_refresh_min_seconds=_int(top, "jwks_refresh_min_seconds", "oidc", 60, 1, 3600),
        http_timeout_seconds=_int(top, "http_timeout_seconds", "oidc", 5, 1, 30),
    )


def _issuer(
    name: str, node: object, where: str, policy: Policy, default_lifetime: int
) -> IssuerConfig:
    body = _mapping(node, where, required=_ISSUER_REQUIRED, optional=_ISSUER_OPTIONAL)
    kind = body.get("kind", "generic")
    if kind not in KINDS:
        raise OidcConfigError(f"{where}.kind", f"must be github, gitlab or generic, got {kind!r}")
    defaults = KINDS[kind]
    owner_ids = _ids(body.get("repository_owner_ids", []), f"{where}.repository_owner_ids")
    repo_ids = _ids(body.get("repository_ids", []), f"{where}.repository_ids")
    if kind != "generic" and not owner_ids and not repo_ids:
        # github.com and gitlab.com issue tokens to everyone: a repository *name* can be
        # forked, renamed or re-registered by someone else; its numeric ids cannot.
        raise OidcConfigError(
            f"{where}.repository_owner_ids",
            f"a {kind} issuer must pin repository_owner_ids or repository_ids",
        )
    if kind == "generic" and (owner_ids or repo_ids):
        raise OidcConfigError(
            f"{where}.repository_owner_ids",
            "only for kind github or gitlab; use required_claims for a generic issuer",
        )
    refuse_prs = body.get("refuse_pull_requests", kind != "generic")
    if not isinstance(refuse_prs, bool):
        raise OidcConfigError(f"{where}.refuse_pull_requests", "must be true or false")
    if refuse_prs and kind == "generic":
        raise OidcConfigError(
            f"{where}.refuse_pull_requests",
            "only for kind github or gitlab; use required_claims for a generic issuer",
        )
    repository_claim = _claim_name(body, "repository_claim", where, defaults.repository_claim)
    allowed = _strings(body.get("allowed_repositories", []), f"{where}.allowed_repositories")
    if allowed and repository_claim is None:
        raise OidcConfigError(
            f"{where}.allowed_repositories", "needs repository_claim for a generic issuer"
        )
    scope = body.get("authorities")
    return IssuerConfig(
        name=name,
        kind=kind,
        issuer=_issuer_url(body["issuer"], f"{where}.issuer"),
        audience=_string(body["audience"], f"{where}.audience"),
        identity=_template(body["identity"], f"{where}.identity"),
        actor_claim=_claim_name(body, "actor_claim", where, defaults.actor_claim),
        repository_claim=repository_claim,
        allowed_repositories=tuple(allowed),
        repository_owner_ids=owner_ids,
        repository_ids=repo_ids,
        refuse_pull_requests=refuse_prs,
        required_claims=_required_claims(body.get("required_claims", {}), where),
        authorities=None if scope is None else _authorities(scope, f"{where}.authorities", policy),
        max_token_lifetime_seconds=_int(
            body, "max_token_lifetime_seconds", where, default_lifetime, 60, 86_400
        ),
    )


# --- fields ----------------------------------------------------------------------------


def _mapping(
    node: object,
    where: str,
    *,
    required: set[str] | frozenset[str] = frozenset(),
    optional: set[str] | frozenset[str] | None = None,
) -> dict[Any, Any]:
    """A mapping with the required keys and, when ``optional`` is given, no others."""
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise OidcConfigError(where, f"must be a mapping, got {type(node).__name__}")
    for key in sorted(required - set(node)):
        raise OidcConfigError(f"{where}.{key}", "is required")
    if optional is not None:
        for key in sorted(set(node) - required - optional, key=str):
            raise OidcConfigError(f"{where}.{key}", "is not a known field")
    return node


def _issuer_url(value: object, where: str) -> str:
    url = _string(value, where)
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password or not parts.hostname:
        raise OidcConfigError(where, f"must be a plain https://host[/path] URL, got {url!r}")
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname)):
        return url
    # The issuer URL is where its keys come from: over plain HTTP anyone on the path could
    # hand us keys. Loopback is allowed for tests and local stacks only.
    raise OidcConfigError(where, f"must use https (http only on loopback), got {url!r}")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _template(value: object, where: str) -> IdentityTemplate:
    text = _string(value, where)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise OidcConfigError(where, f"is not a valid template: {exc}") from None
    claims: list[str] = []
    separators: set[str] = set()
    for prefix, field, spec, conversion in parsed:
        between = {ch for ch in prefix if not ch.isalnum()}
        separators |= between
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise OidcConfigError(where, f"{{{field}}}: use plain claim names such as {{ref}}")
        if claims and not between:
            # {a}{b} or {a}x{b}: "ab"+"c" and "a"+"bc" would give the same identity.
            raise OidcConfigError(
                where, f"put a separator such as ':' between {{{claims[-1]}}} and {{{field}}}"
            )
        claims.append(field)
    if not claims:
        raise OidcConfigError(where, "names no claim: every token would get the same identity")
    return IdentityTemplate(text=text, claims=tuple(claims), separators=frozenset(separators))


def _claim_name(body: Mapping[str, Any], key: str, where: str, default: str | None) -> str | None:
    if key not in body:
        return default
    name = _string(body[key], f"{where}.{key}")
    if not name.isidentifier():
        raise OidcConfigError(f"{where}.{key}", f"{name!r} is not a claim name")
    return name


def _required_claims(node: object, where: str) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for claim, values in _mapping(node, f"{where}.required_claims").items():
        w = f"{where}.required_claims.{claim}"
        if not isinstance(claim, str) or not claim.isidentifier():
            raise OidcConfigError(w, "is not a claim name")
        if claim in {"iss", "aud", "exp", "nbf", "iat", "jti"}:
            raise OidcConfigError(w, "is checked by the service itself")
        listed = values if isinstance(values, list) else [values]
        out[claim] = frozenset(_ids(listed, w))
        if not out[claim]:
            raise OidcConfigError(w, "must list at least one accepted value")
    return out


def _authorities(node: object, where: str, policy: Policy) -> frozenset[str]:
    names = _strings(node, where)
    for i, name in enumerate(names):
        if name not in policy.authorities:
            known = ", ".join(sorted(policy.authorities))
            raise OidcConfigError(f"{where}[{i}]", f"unknown authority {name!r} (known: {known})")
    return frozenset(names)


def _ids(node: object, where: str) -> frozenset[str]:
    """Claim values as the tokens carry them (strings); YAML numbers are accepted."""
    if not isinstance(node, list):
        raise OidcConfigError(where, "must be a list")
    out = set()
    for i, item in enumerate(node):
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise OidcConfigError(f"{where}[{i}]", f"must be a string or number, got {item!r}")
        out.add(_string(str(item), f"{where}[{i}]"))
    return frozenset(out)


def _strings(node: object, where: str) -> list[str]:
    if not isinstance(node, list):
        raise OidcConfigError(where, "must be a list")
    return [_string(item, f"{where}[{i}]") for i, item in enumerate(node)]


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise OidcConfigError(where, "must be a non-empty string without surrounding spaces")
    return value


def _int(body: Mapping[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OidcConfigError(f"{where}.{key}", f"must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise OidcConfigError(f"{where}.{key}", f"must be between {lo} and {hi}, got {value}")
    return value


@functools.cache
def current_oidc_config() -> OidcConfig:
    """The service's OIDC configuration from ``settings.OIDC_CONFIG_FILE`` (once per process)."""
    from django.conf import settings

    from signing_service.policy import current_policy

    path = settings.OIDC_CONFIG_FILE
    if not path:
        return DISABLED
    return load_oidc_config(Path(path), current_policy())
