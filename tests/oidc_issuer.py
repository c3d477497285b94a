"""A local OIDC issuer for tests: real RSA and EC keys, discovery and JWKS served on loopback.

One ``http.server`` thread on a free port serves any number of issuers under path prefixes
(``/github``, ``/gitlab``): each has its own keys, its discovery document and its JWKS.
Requests are counted per path so tests can see what the service fetched and how often.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "https://sign.test"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


@dataclass
class IssuerKeys:
    rsa: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    ec: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    rsa_kid: str = field(default_factory=lambda: f"rsa-{uuid.uuid4().hex[:8]}")
    ec_kid: str = field(default_factory=lambda: f"ec-{uuid.uuid4().hex[:8]}")

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        return {
            "keys": [
                {**rsa_jwk, "kid": self.rsa_kid, "use": "sig", "alg": "RS256"},
                {**ec_jwk, "kid": self.ec_kid, "use": "sig", "alg": "ES256"},
            ]
        }

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class Issuer:
    """One issuer at ``url`` (``http://127.0.0.1:PORT/<name>``)."""

    server: LocalIssuers
    name: str
    keys: IssuerKeys = field(default_factory=IssuerKeys)
    #: What the discovery document says; tests can point these elsewhere.
    discovery_issuer: str | None = None
    jwks_uri: str | None = None

    @property
    def url(self) -> str:
        return f"{self.server.base}/{self.name}"

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.discovery_issuer or self.url,
            "jwks_uri": self.jwks_uri or f"{self.url}/.well-known/jwks",
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base = {
            "iss": self.url,
            "aud": AUDIENCE,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        }
        merged = {**base, **overrides}
        return {k: v for k, v in merged.items() if v is not None}

    def token(
        self,
        claims: dict[str, Any],
        *,
        alg: str = "RS256",
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """A token signed with this issuer's real key for ``alg`` (RS256: RSA, ES256: EC)."""
        key = self.keys.rsa if alg == "RS256" else self.keys.ec
        default_kid = self.keys.rsa_kid if alg == "RS256" else self.keys.ec_kid
        return jwt.encode(
            claims, key, algorithm=alg, headers={"kid": kid or default_kid, **(headers or {})}
        )

    def unsigned_token(self, claims: dict[str, Any]) -> str:
        """``alg: none``: a header, the claims and an empty signature."""
        header = {"alg": "none", "typ": "JWT", "kid": self.keys.rsa_kid}
        return f"{b64json(header)}.{b64json(claims)}."

    def hs256_with_public_key(self, claims: dict[str, Any]) -> str:
        """The classic confusion: HMAC-SHA256 keyed with the issuer's RSA public key PEM."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.keys.rsa_kid}
        signing_input = f"{b64json(header)}.{b64json(claims)}"
        mac = hmac.new(self.keys.rsa_public_pem(), signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{b64url(mac.digest())}"


class LocalIssuers:
    """The loopback HTTP server behind every test issuer."""

    def __init__(self) -> None:
        self.issuers: dict[str, Issuer] = {}
        self.hits: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, name: str) -> Issuer:
        issuer = self.issuers[name] = Issuer(self, name)
        return issuer

    def serve(self, path: str) -> dict[str, Any] | None:
        self.hits[path] += 1
        name, _, rest = path.strip("/").partition("/")
        issuer = self.issuers.get(name)
        if issuer is None:
            return None
        if rest == ".well-known/openid-configuration":
            return issuer.discovery()
        if rest == ".well-known/jwks":
            return issuer.keys.jwks()
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(issuers: LocalIssuers) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = issuers.serve(self.path)
            data = json.dumps(body).encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def local_issuers() -> Iterator[LocalIssuers]:
    server = LocalIssuers()
    try:
        yield server
    finally:
        server.close()


# --- the service configured for two local issuers --------------------------------------

TEST_POLICY = """
certificate_policy:
  version: "oidc-test"
  signing_authorities:
    production:
      type: key-based
      key_storage: HSM
      key_algorithm: ECDSA-P256
      authorized_signers: ["repo:acme/models:environment:production", ml-platform-ci@company.com]
      requires_approval: true
      approval_count: 2
    staging:
      type: key-based
      key_storage: HSM
      key_algorithm: ECDSA-P256
      authorized_signers:
        - "repo:acme/*:environment:staging"
        - "project_path:ml/models:ref_type:branch:ref:main"
        - ml-platform-ci@company.com
      requires_approval: false
    development:
      type: key-based
      key_storage: HSM
      key_algorithm: ECDSA-P256
      authorized_signers: ["*@company.com"]
      requires_approval: false
"""

TEST_OIDC_CONFIG = """
oidc:
  require_oidc: [production]
  issuers:
    github:
      kind: github
      issuer: {github}
      audience: {audience}
      identity: "repo:{{repository}}:environment:{{environment}}"
      repository_owner_ids: ["1001"]
      allowed_repositories: ["acme/*"]
      max_token_lifetime_seconds: 900
    gitlab:
      kind: gitlab
      issuer: {gitlab}
      audience: {audience}
      identity: "project_path:{{project_path}}:ref_type:{{ref_type}}:ref:{{ref}}"
      repository_owner_ids: [3003]
      required_claims: {{ref_protected: ["true"]}}
"""


@dataclass
class OidcService:
    github: Issuer
    gitlab: Issuer
    issuers: LocalIssuers

    def github_claims(self, **overrides: Any) -> dict[str, Any]:
        """What a GitHub Actions job in acme/models, environment staging, gets."""
        values = {
            "sub": "repo:acme/models:environment:staging",
            "repository": "acme/models",
            "repository_owner": "acme",
            "repository_owner_id": "1001",
            "repository_id": "2002",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "sha": "a" * 40,
            "environment": "staging",
            "event_name": "push",
            "actor": "dave",
            "actor_id": "77",
            "job_workflow_ref": "acme/models/.github/workflows/sign.yml@refs/heads/main",
            "runner_environment": "github-hosted",
        }
        return self.github.claims(**{**values, **overrides})

    def gitlab_claims(self, **overrides: Any) -> dict[str, Any]:
        """What a GitLab CI job on the protected main branch of ml/models gets."""
        values = {
            "sub": "project_path:ml/models:ref_type:branch:ref:main",
            "namespace_id": "3003",
            "namespace_path": "ml",
            "project_id": "4004",
            "project_path": "ml/models",
            "user_id": "5",
            "user_login": "erin",
            "user_email": "erin@company.com",
            "pipeline_id": "99",
            "pipeline_source": "push",
            "ref": "main",
            "ref_type": "branch",
            "ref_protected": "true",
            "sha": "b" * 40,
        }
        return self.gitlab.claims(**{**values, **overrides})

    def github_token(self, **overrides: Any) -> str:
        return self.github.token(self.github_claims(**overrides))

    def gitlab_token(self, **overrides: Any) -> str:
        return self.gitlab.token(self.gitlab_claims(**overrides), alg="ES256")


@pytest.fixture
def oidc_service(
    local_issuers: LocalIssuers, settings: Any, tmp_path: Any, redis_url: str
) -> OidcService:
    """The service with TEST_POLICY and both local issuers trusted; jti kept in test Redis."""
    github, gitlab = local_issuers.add("github"), local_issuers.add("gitlab")
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    config = tmp_path / "oidc.yaml"
    config.write_text(
        TEST_OIDC_CONFIG.format(github=github.url, gitlab=gitlab.url, audience=AUDIENCE)
    )
    settings.SIGNING_POLICY_FILE = policy
    settings.OIDC_CONFIG_FILE = str(config)
    settings.OIDC_REDIS_URL = redis_url
    return OidcService(github, gitlab, local_issuers)
