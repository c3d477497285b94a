"""A small, honest HashiCorp Vault transit server for tests (SPEC section 6).

No Vault binary can be installed on these machines, so the tests run hvac against this
server. It answers with Vault's JSON shapes and status codes, signs with real ECDSA keys
(``cryptography``), and is modelled on the Vault source (``builtin/logical/transit``:
``path_keys.go``, ``path_keys_config.go``, ``path_rotate.go``, ``path_sign_verify.go``,
``path_export.go``; ``sdk/helper/keysutil/policy.go`` ``SignWithOptions`` and
``VerifySignatureWithOptions``; ``sdk/logical/response_util.go``) and on hvac 2.4.

Implemented (mount ``transit`` by default, plus ``sys`` and ``auth``):

* ``GET|HEAD /v1/sys/health``: 200 unsealed, 503 sealed, 501 uninitialised (honours
  ``activecode``, ``sealedcode``, ``uninitcode``); needs no token.
* ``POST /v1/auth/approle/login`` (``role_id``, ``secret_id``): issues a new token;
  wrong credentials answer 400 ``invalid role or secret ID``.
* ``GET /v1/auth/token/lookup-self``.
* ``POST /v1/transit/keys/:name``: create ``ecdsa-p256|p384|p521`` keys with
  ``exportable`` and ``allow_plaintext_backup``; creating an existing key changes nothing
  and answers 200 with the warning ``key NAME already existed`` (Vault upserts).
* ``GET /v1/transit/keys/:name``: Vault's read-key fields; ``keys`` maps each version to
  ``{"name": "P-256", "public_key": PEM, "creation_time": RFC 3339, ...}``; unknown key:
  404 with ``{"errors": []}``.
* ``POST /v1/transit/keys/:name/rotate`` (400 ``key not found`` for unknown keys).
* ``POST /v1/transit/keys/:name/config``: ``min_decryption_version``,
  ``min_encryption_version`` (refused above the latest version), ``deletion_allowed``,
  and the one-way ``exportable`` / ``allow_plaintext_backup`` flags, with Vault's checks.
* ``POST /v1/transit/sign/:name[/:hash_algorithm]``: ``input``, ``key_version`` (0 or
  absent: latest), ``hash_algorithm`` (sha1, sha2-224/256/384/512), ``prehashed``,
  ``marshaling_algorithm`` ``asn1`` (DER, standard base64) or ``jws`` (r||s, URL-safe
  base64); answers ``signature: "vault:vN:..."`` and ``key_version``. As in Vault, a
  version above the latest or below ``min_encryption_version`` is a user error that Vault
  reports as HTTP **500** ``1 error occurred: ... requested version for signing is less
  than the minimum encryption key version`` (hashicorp/vault#20713); an unknown key is
  400 ``signing key not found``.
* ``POST /v1/transit/verify/:name[/:hash_algorithm]``: ``valid: true|false``; versions
  below ``min_decryption_version`` or above the latest are 400, as in Vault.
* ``GET /v1/transit/export/:type/:name[/:version]``: ``signing-key`` (SEC1 PEM) and
  ``public-key``; a non-exportable key answers 400 ``private key material is not
  exportable`` (older Vault releases said ``key is not exportable``).
* Tokens: every path but health and login needs ``X-Vault-Token``; missing: 403
  ``permission denied``; unknown or revoked: 403 ``permission denied`` + ``invalid token``
  (Vault 1.17+). While sealed, every path but health answers 503 ``Vault is sealed``.

Administration, for ``deploy/vault/setup.py`` (root token only):

* ``GET /v1/sys/mounts``, ``POST /v1/sys/mounts/:path`` (``type: transit``; the server's one
  transit mount, absent until enabled when started with ``mounted=False``).
* ``PUT|GET /v1/sys/policy/:name``: ACL policies of ``path "..." { capabilities = [...] }``
  blocks only (anything else is refused, so a policy is never half understood).
* ``GET /v1/sys/auth``, ``POST /v1/sys/auth/approle``; ``POST|GET
  /v1/auth/approle/role/:name`` (``token_policies``), ``GET .../role-id``, ``POST
  .../secret-id``. A token from logging in with such a role's credentials is held to its
  policies, as Vault's ACL does it for exact paths and a trailing ``*``: ``read`` for GET,
  ``create`` for a POST that creates a transit key, ``update`` for other POSTs and PUTs,
  ``delete`` for DELETE; anything else answers 403 ``permission denied``. A block's
  ``allowed_parameters`` hold a create or update to the parameters it lists (any other is
  refused) and to the values listed for each (``[]``: any value), compared as Vault does
  (``vault/acl.go``: strings glob, other JSON values must be equal and of the same type).
  The default policy's ``auth/token/lookup-self`` is allowed.

Not implemented (answered 400/404/405 with a message saying so, never faked): other key
types (AES, RSA, ed25519, HMAC), ``batch_input``, ``context``/derivation, key deletion,
trim, backup/restore, import, HMAC verification, other auth methods, policies for the
built-in ``role_id``/``secret_id`` pair and the root token (they may do everything), policy
features beyond path, capabilities and ``allowed_parameters`` (deny precedence is honoured;
templating, ``+`` globs, ``denied_parameters`` and ``required_parameters`` are not), leases and
token TTLs, namespaces, ``prehashed`` inputs whose
length is not a SHA-1/SHA-2 digest size (Vault would sign those).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

VERSION = "1.17.0+transit-test-server"
_CURVES: dict[str, tuple[type[ec.EllipticCurve], str]] = {
    "ecdsa-p256": (ec.SECP256R1, "P-256"),
    "ecdsa-p384": (ec.SECP384R1, "P-384"),
    "ecdsa-p521": (ec.SECP521R1, "P-521"),
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha2-224": hashes.SHA224,
    "sha2-256": hashes.SHA256,
    "sha2-384": hashes.SHA384,
    "sha2-512": hashes.SHA512,
}
# A prehashed input is signed as is; cryptography needs to be told its length.
_HASH_BY_SIZE: dict[int, type[hashes.HashAlgorithm]] = {
    20: hashes.SHA1,
    28: hashes.SHA224,
    32: hashes.SHA256,
    48: hashes.SHA384,
    64: hashes.SHA512,
}


class VaultError(Exception):
    """An error answer: HTTP status and Vault's ``errors`` list."""

    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


def _multierror(*messages: str) -> str:
    """Go's hashicorp/go-multierror text, which Vault puts in errors it did not shape."""
    head = "1 error occurred" if len(messages) == 1 else f"{len(messages)} errors occurred"
    return head + ":\n" + "".join(f"\t* {m}\n" for m in messages) + "\n"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _int(value: Any, name: str) -> int:
    # Vault's framework.TypeInt also accepts numeric strings.
    try:
        return int(value)
    except (TypeError, ValueError):
        raise VaultError(400, f"error converting input {value!r} for field {name!r}") from None


def _bool(value: Any) -> bool:
    return value in (True, "true", "True", "1", 1)


def _b64decode(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value or ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VaultError(400, f"unable to decode {what} as base64: {exc}") from None


@dataclass
class KeyVersion:
    private_key: ec.EllipticCurvePrivateKey
    creation_time: str = field(default_factory=_now)


@dataclass
class TransitKey:
    """One named key ring, with Vault's policy fields."""

    name: str
    type: str
    exportable: bool = False
    allow_plaintext_backup: bool = False
    deletion_allowed: bool = False
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    min_available_version: int = 0
    versions: dict[int, KeyVersion] = field(default_factory=dict)

    @property
    def latest_version(self) -> int:
        return max(self.versions, default=0)

    def rotate(self) -> None:
        curve = _CURVES[self.type][0]
        self.versions[self.latest_version + 1] = KeyVersion(ec.generate_private_key(curve()))

    def public_pem(self, version: int) -> str:
        public = self.versions[version].private_key.public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode("ascii")

    def describe(self) -> dict[str, Any]:
        """The read-key ``data`` (Vault's ``formatKeyPolicy`` for ECDSA keys)."""
        keys = {
            str(v): {
                "name": _CURVES[self.type][1],
                "public_key": self.public_pem(v),
                "certificate_chain": "",
                "creation_time": kv.creation_time,
            }
            for v, kv in sorted(self.versions.items())
        }
        return {
            "name": self.name,
            "type": self.type,
            "derived": False,
            "deletion_allowed": self.deletion_allowed,
            "exportable": self.exportable,
            "allow_plaintext_backup": self.allow_plaintext_backup,
            "latest_version": self.latest_version,
            "min_available_version": self.min_available_version,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version,
            "supports_encryption": False,
            "supports_decryption": False,
            "supports_derivation": False,
            "supports_signing": True,
            "auto_rotate_period": 0,
            "imported_key": False,
            "keys": keys,
        }


class VaultTransitServer:
    """In-memory Vault with one transit mount, served on 127.0.0.1 on a free port."""

    def __init__(
        self, *, mount: str = "transit", token: str | None = None, mounted: bool = True
    ) -> None:
        self.mount = mount
        self.mounted = mounted
        self.policies: dict[str, str] = {}
        self.approle_enabled = False
        #: role name -> {"role_id", "secret_ids", "policies"}
        self.roles: dict[str, dict[str, Any]] = {}
        #: tokens issued to an AppRole role: held to these policies (others may do everything)
        self.token_policies: dict[str, list[str]] = {}
        self.token = token or "hvs." + secrets.token_urlsafe(18)
        self.role_id = str(uuid.uuid4())
        self.secret_id = str(uuid.uuid4())
        self.keys: dict[str, TransitKey] = {}
        self.tokens: set[str] = {self.token}
        self.sealed = False
        self.initialized = True
        #: (method, path) of every request, and the JSON body of every sign request.
        self.calls: list[tuple[str, str]] = []
        self.sign_requests: list[dict[str, Any]] = []
        self.logins = 0
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def start(self) -> VaultTransitServer:
        handler = type("Handler", (_Handler,), {"vault": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later requests get "connection refused". Idempotent."""
        if self._httpd is not None and self._thread is not None and self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> VaultTransitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- operator actions ------------------------------------------------------------

    def seal(self) -> None:
        self.sealed = True

    def unseal(self) -> None:
        self.sealed = False

    def revoke(self, token: str) -> None:
        with self.lock:
            self.tokens.discard(token)

    # -- request handling ------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, body: dict[str, Any], token: str
    ) -> tuple[int, Any]:
        """Return (status, JSON body). Raises :class:`VaultError`."""
        parts = urlsplit(raw_path)
        path = parts.path.removeprefix("/v1/").strip("/")
        with self.lock:
            self.calls.append((method, path))
            if path == "sys/health":
                return self._health(parse_qs(parts.query))
            if self.sealed or not self.initialized:
                raise VaultError(503, "Vault is sealed")
            if path == "auth/approle/login" and method in ("POST", "PUT"):
                return 200, self._login(body)
            self._check_token(token)
            if path == "auth/token/lookup-self" and method == "GET":
                policies = self.token_policies.get(token, ["root"])
                return 200, _envelope({"accessor": "test", "policies": policies, "ttl": 0})
            self._authorize(token, method, path, body)
            if path.startswith(("sys/", "auth/approle/role/")):
                return self._admin(method, path, body)
            prefix = self.mount + "/"
            if not path.startswith(prefix) or not self.mounted:
                raise VaultError(404, f'no handler for route "{path}". route entry not found.')
            return 200, _envelope(*self._transit(method, path.removeprefix(prefix), body))

    def _health(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        def code(name: str, default: int) -> int:
            return int(query.get(name, [default])[0])

        if not self.initialized:
            status = code("uninitcode", 501)
        elif self.sealed:
            status = code("sealedcode", 503)
        else:
            status = code("activecode", 200)
        return status, {
            "initialized": self.initialized,
            "sealed": self.sealed or not self.initialized,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VERSION,
        }

    def _login(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("role_id"):
            raise VaultError(400, _multierror("invalid credentials"))
        token = "hvs." + secrets.token_urlsafe(18)
        policies = ["default", "modelsign"]
        role = next(
            (
                r
                for r in self.roles.values()
                if self.approle_enabled and r["role_id"] == body["role_id"]
            ),
            None,
        )
        if role is not None and body.get("secret_id") in role["secret_ids"]:
            policies = ["default", *role["policies"]]
            self.token_policies[token] = policies
        elif body.get("role_id") != self.role_id or body.get("secret_id") != self.secret_id:
            raise VaultError(400, "invalid role or secret ID")
        self.tokens.add(token)
        self.logins += 1
        auth = {
            "client_token": token,
            "accessor": secrets.token_urlsafe(12),
            "policies": policies,
            "token_policies": policies,
            "metadata": {"role_name": "modelsign"},
            "lease_duration": 3600,
            "renewable": True,
            "token_type": "service",
            "orphan": True,
        }
        return {**_envelope(None), "auth": auth}

    def _check_token(self, token: str) -> None:
        if not token:
            raise VaultError(403, "permission denied")
        if token not in self.tokens:
            raise VaultError(403, _multierror("permission denied", "invalid token"))

    def _authorize(self, token: str, method: str, path: str, body: dict[str, Any]) -> None:
        """Vault's ACL check, for tokens issued to an AppRole role with policies."""
        names = self.token_policies.get(token)
        if names is None:
            return
        if method in ("GET", "HEAD"):
            needed = "read"
        elif method == "DELETE":
            needed = "delete"
        else:
            creating = path.startswith(f"{self.mount}/keys/") and path.count("/") == 2
            needed = "create" if creating and path.rsplit("/", 1)[1] not in self.keys else "update"
        granted: set[str] = set()
        # Parameter constraints of the rules that grant the capability: merged as Vault
        # merges policies (a rule without constraints lifts them all).
        constraints: list[dict[str, list[Any]] | None] = []
        for name in names:
            for rule in _policy_rules(self.policies.get(name, "")):
                pattern = rule.pattern
                matches = (
                    path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern
                )
                if matches:
                    granted |= set(rule.capabilities)
                    if needed in rule.capabilities:
                        constraints.append(rule.allowed_parameters)
        if needed not in granted or "deny" in granted:
            raise VaultError(403, _multierror("permission denied"))
        if needed in ("create", "update") and None not in constraints:
            merged: dict[str, list[Any]] = {}
            for allowed in constraints:
                for param, values in (allowed or {}).items():
                    known = merged.get(param)
                    merged[param] = [] if known == [] or not values else [*(known or []), *values]
            if not _parameters_allowed(body, merged):
                raise VaultError(403, _multierror("permission denied"))

    def _admin(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        segs = path.split("/")
        post = method in ("POST", "PUT")
        match segs:
            case ["sys", "mounts"] if method == "GET":
                mounts = {"sys/": {"type": "system"}}
                if self.mounted:
                    mounts[self.mount + "/"] = {"type": "transit", "options": None}
                return 200, {**mounts, **_envelope(mounts)}
            case ["sys", "mounts", *where] if post:
                return self._enable_transit("/".join(where), body)
            case ["sys", "policy", name] if post:
                _parse_policy(str(body.get("policy") or body.get("rules") or ""), strict=True)
                self.policies[name] = str(body.get("policy") or body.get("rules"))
                return 204, None
            case ["sys", "policy", name] if method == "GET":
                if name not in self.policies:
                    raise VaultError(404)
                rules = {"name": name, "rules": self.policies[name]}
                return 200, {**rules, **_envelope(rules)}
            case ["sys", "auth"] if method == "GET":
                methods = {"token/": {"type": "token"}}
                if self.approle_enabled:
                    methods["approle/"] = {"type": "approle"}
                return 200, {**methods, **_envelope(methods)}
            case ["sys", "auth", "approle"] if post:
                if body.get("type") != "approle":
                    raise VaultError(400, "only the approle auth method is implemented")
                if self.approle_enabled:
                    raise VaultError(400, "path is already in use at approle/")
                self.approle_enabled = True
                return 204, None
            case ["auth", "approle", "role", name, *rest] if self.approle_enabled:
                return self._approle(method, name, rest, body)
        raise VaultError(404, _multierror(f"unsupported path {path}"))

    def _enable_transit(self, where: str, body: dict[str, Any]) -> tuple[int, Any]:
        if body.get("type") != "transit":
            raise VaultError(400, "only the transit secrets engine is implemented")
        if where.strip("/") != self.mount:
            raise VaultError(400, f"this test server has one transit mount: {self.mount}")
        if self.mounted:
            raise VaultError(400, f"path is already in use at {self.mount}/")
        self.mounted = True
        return 204, None

    def _approle(
        self, method: str, name: str, rest: list[str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        if not rest and method in ("POST", "PUT"):
            policies = body.get("token_policies") or body.get("policies") or []
            if isinstance(policies, str):
                policies = [p.strip() for p in policies.split(",") if p.strip()]
            role = self.roles.setdefault(
                name, {"role_id": str(uuid.uuid4()), "secret_ids": set(), "policies": []}
            )
            role["policies"] = list(policies)
            return 204, None
        role = self.roles.get(name)
        if role is None and not rest and method == "GET":
            raise VaultError(404)  # Vault: a read of a missing role is a 404, errors []
        if role is None:
            raise VaultError(400, f"role {name} does not exist")
        if not rest and method == "GET":
            return 200, _envelope({"token_policies": role["policies"]})
        if rest == ["role-id"] and method == "GET":
            return 200, _envelope({"role_id": role["role_id"]})
        if rest == ["secret-id"] and method in ("POST", "PUT"):
            secret_id = str(uuid.uuid4())
            role["secret_ids"].add(secret_id)
            data = {
                "secret_id": secret_id,
                "secret_id_accessor": str(uuid.uuid4()),
                "secret_id_ttl": 0,
            }
            return 200, _envelope(data)
        raise VaultError(405, _multierror("unsupported operation"))

    def _transit(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str] | None]:
        segs = path.split("/")
        post = method in ("POST", "PUT")
        match segs:
            case ["keys", name] if post:
                return self._create(name, body)
            case ["keys", name] if method == "GET":
                return self._key(name, missing=404).describe(), None
            case ["keys", name, "rotate"] if post:
                key = self._key(name, missing=400, message="key not found")
                key.rotate()
                return key.describe(), None
            case ["keys", name, "config"] if post:
                return _configure(self._config_key(name), body), None
            case ["sign", name] | ["sign", name, _] if post:
                self.sign_requests.append(dict(body))
                options = _sign_options(body, segs[2] if len(segs) == 3 else None)
                key = self._key(name, missing=400, message="signing key not found")
                return _sign(key, body, *options), None
            case ["verify", name] | ["verify", name, _] if post:
                return self._verify(name, body, segs[2] if len(segs) == 3 else None), None
            case ["export", kind, name] | ["export", kind, name, _] if method == "GET":
                version = segs[3] if len(segs) == 4 else ""
                return _export(kind, self._key(name, missing=404), version), None
            case ["keys", _] | ["keys", _, "rotate" | "config"] | ["sign" | "verify", *_]:
                raise VaultError(405, _multierror("unsupported operation"))
        raise VaultError(404, _multierror("unsupported path"))

    def _key(self, name: str, *, missing: int, message: str = "") -> TransitKey:
        key = self.keys.get(name)
        if key is None:
            # Vault answers a read of a missing key with 404 and an empty errors list.
            raise VaultError(missing, *([message] if message else []))
        return key

    def _config_key(self, name: str) -> TransitKey:
        return self._key(name, missing=400, message=f"no existing key named {name} could be found")

    def _create(self, name: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
        if name in self.keys:
            # Vault upserts: the existing key and its settings are kept as they are.
            return self.keys[name].describe(), [f"key {name} already existed"]
        key_type = str(body.get("type") or "aes256-gcm96")
        if key_type not in _CURVES:
            raise VaultError(400, f"key type {key_type} is not implemented by the test server")
        if body.get("batch_input") is not None or _bool(body.get("derived")):
            raise VaultError(400, "derived keys are not implemented by the test server")
        key = TransitKey(
            name=name,
            type=key_type,
            exportable=_bool(body.get("exportable")),
            allow_plaintext_backup=_bool(body.get("allow_plaintext_backup")),
        )
        key.rotate()
        self.keys[name] = key
        return key.describe(), None

    def _verify(self, name: str, body: dict[str, Any], url_hash: str | None) -> dict[str, Any]:
        if "hmac" in body or "cmac" in body or body.get("batch_input") is not None:
            raise VaultError(400, "only single 'signature' verification is implemented")
        if "signature" not in body:
            raise VaultError(
                400, "missing one of 'signature', 'hmac' or 'cmac' arguments to verify"
            )
        hash_name, marshaling = _sign_options(body, url_hash)
        key = self._key(name, missing=400, message="signature verification key not found")
        digest = _digest(body, hash_name, "input")
        return {"valid": _verify(key, str(body["signature"]), digest, marshaling)}


_PARAMETER = r'"?([A-Za-z0-9_*]+)"?\s*=\s*\[([^\]]*)\]'
_POLICY_BLOCK = re.compile(
    r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*'
    r"(?:allowed_parameters\s*=\s*\{((?:\s*" + _PARAMETER + r"\s*)*)\}\s*)?\}",
    re.MULTILINE,
)
_CAPABILITIES = {"create", "read", "update", "patch", "delete", "list", "sudo", "deny"}


@dataclass(frozen=True)
class PolicyRule:
    """One ``path`` block: its capabilities and, if given, its ``allowed_parameters``."""

    pattern: str
    capabilities: list[str]
    #: None: any parameter; else lower-case name -> allowed values ([] allows any value).
    allowed_parameters: dict[str, list[Any]] | None = None


def _policy_rules(text: str, *, strict: bool = False) -> list[PolicyRule]:
    """The ``path`` blocks of an HCL ACL policy; with ``strict``, refuse anything else."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    rules = []
    for match in _POLICY_BLOCK.finditer(body):
        pattern, caps, params = match.group(1), match.group(2), match.group(3)
        capabilities = [c.strip().strip('"') for c in caps.split(",") if c.strip()]
        if strict and not set(capabilities) <= _CAPABILITIES:
            raise VaultError(400, f"unknown capabilities in {pattern!r}: {capabilities}")
        allowed = {
            name.lower(): [_hcl_value(v) for v in values.split(",") if v.strip()]
            for name, values in re.findall(_PARAMETER, params or "")
        } or None  # as in Vault, an empty map constrains nothing
        rules.append(PolicyRule(pattern, capabilities, allowed))
    if strict and (not rules or _POLICY_BLOCK.sub("", body).strip()):
        raise VaultError(
            400, "the test server understands only path blocks of capabilities and "
            "allowed_parameters",
        )  # fmt: skip
    return rules


def _parse_policy(text: str, *, strict: bool = False) -> list[tuple[str, list[str]]]:
    """(path, capabilities) of each ``path`` block of an HCL ACL policy."""
    return [(r.pattern, r.capabilities) for r in _policy_rules(text, strict=strict)]


def _hcl_value(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        raise VaultError(400, f"cannot parse the policy value {text!r}") from None


def _parameters_allowed(body: dict[str, Any], allowed: dict[str, list[Any]]) -> bool:
    """Vault's ACL check of a request's parameters against ``allowed_parameters``
    (``vault/acl.go``): every parameter must be listed (or ``*``), with one of the listed
    values (an empty list allows any); strings may glob with ``*``, other values must be
    equal and of the same JSON type (the string "false" is not the boolean false)."""
    for name, value in body.items():
        values = allowed.get(name.lower(), allowed.get("*"))
        if values is None:
            return False
        if values and not any(_value_matches(value, v) for v in values):
            return False
    return True


def _value_matches(value: Any, listed: Any) -> bool:
    if isinstance(value, str) and isinstance(listed, str):
        return fnmatch.fnmatchcase(value, listed.replace("[", "[[]"))
    return type(value) is type(listed) and value == listed


def _envelope(data: Any, warnings: list[str] | None = None) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": warnings,
        "auth": None,
        "mount_type": "transit",
    }


def _configure(key: TransitKey, body: dict[str, Any]) -> dict[str, Any]:
    """Vault's ``pathKeysConfigWrite``: all checks first, then apply (no partial update)."""
    min_dec, min_enc = key.min_decryption_version, key.min_encryption_version
    if "min_decryption_version" in body:
        min_dec = _int(body["min_decryption_version"], "min_decryption_version") or 1
        if min_dec < 0:
            raise VaultError(400, "min decryption version cannot be negative")
        if min_dec != key.min_decryption_version and min_dec > key.latest_version:
            raise VaultError(
                400,
                f"cannot set min decryption version of {min_dec}, latest key version is "
                f"{key.latest_version}",
            )
    if "min_encryption_version" in body:
        min_enc = _int(body["min_encryption_version"], "min_encryption_version")
        if min_enc < 0:
            raise VaultError(400, "min encryption version cannot be negative")
        if min_enc != key.min_encryption_version and min_enc > key.latest_version:
            raise VaultError(
                400,
                f"cannot set min encryption version of {min_enc}, latest key version is "
                f"{key.latest_version}",
            )
    if 0 < min_enc < min_dec:
        raise VaultError(
            400,
            "cannot set min encryption/decryption values; min encryption version of "
            f"{min_enc} must be greater than or equal to min decryption version of {min_dec}",
        )
    key.min_decryption_version, key.min_encryption_version = min_dec, min_enc
    if "deletion_allowed" in body:
        key.deletion_allowed = _bool(body["deletion_allowed"])
    # Once set, these two can never be unset (Vault ignores false).
    key.exportable = key.exportable or _bool(body.get("exportable"))
    key.allow_plaintext_backup = key.allow_plaintext_backup or _bool(
        body.get("allow_plaintext_backup")
    )
    return key.describe()


def _sign_options(body: dict[str, Any], url_hash: str | None) -> tuple[str, str]:
    hash_name = url_hash or body.get("hash_algorithm") or body.get("algorithm") or "sha2-256"
    if hash_name not in _HASHES:
        raise VaultError(400, f'invalid hash algorithm "{hash_name}"')
    marshaling = body.get("marshaling_algorithm") or "asn1"
    if marshaling not in ("asn1", "jws"):
        raise VaultError(400, f'invalid marshaling type "{marshaling}"')
    return str(hash_name), str(marshaling)


def _digest(body: dict[str, Any], hash_name: str, field_name: str) -> bytes:
    data = _b64decode(body.get(field_name), field_name)
    if _bool(body.get("prehashed")):
        return data  # ECDSA ignores hash_algorithm for prehashed input, as in Vault
    h = hashes.Hash(_HASHES[hash_name]())
    h.update(data)
    return h.finalize()


def _prehashed(digest: bytes) -> ec.ECDSA:
    cls = _HASH_BY_SIZE.get(len(digest))
    if cls is None:
        raise VaultError(400, f"prehashed input of {len(digest)} bytes is not implemented")
    return ec.ECDSA(Prehashed(cls()))


def _sign(key: TransitKey, body: dict[str, Any], hash_name: str, marshaling: str) -> dict[str, Any]:
    if body.get("batch_input") is not None:
        raise VaultError(400, "batch_input is not implemented by the test server")
    digest = _digest(body, hash_name, "input")
    version = _int(body.get("key_version") or 0, "key_version") or key.latest_version
    # SignWithOptions returns errutil.UserError here, which pathSignWrite passes up as a
    # plain error: Vault answers 500 (hashicorp/vault#20713).
    if version < 0:
        raise VaultError(500, _multierror("requested version for signing is negative"))
    if version > key.latest_version:
        raise VaultError(
            500,
            _multierror("requested version for signing is higher than the latest key version"),
        )
    if key.min_encryption_version > 0 and version < key.min_encryption_version:
        raise VaultError(
            500,
            _multierror(
                "requested version for signing is less than the minimum encryption key version"
            ),
        )
    der = key.versions[version].private_key.sign(digest, _prehashed(digest))
    return {
        "signature": f"vault:v{version}:{_marshal(der, key, marshaling)}",
        "key_version": version,
    }


def _marshal(der: bytes, key: TransitKey, marshaling: str) -> str:
    if marshaling == "asn1":
        return base64.b64encode(der).decode("ascii")
    size = (_CURVES[key.type][0]().key_size + 7) // 8
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _verify(key: TransitKey, signature: str, digest: bytes, marshaling: str) -> bool:
    if not signature.startswith("vault:v"):
        raise VaultError(400, "invalid signature: no prefix")
    fields = signature.removeprefix("vault:v").split(":", 1)
    if len(fields) != 2:
        raise VaultError(400, "invalid signature: wrong number of fields")
    version = _int(fields[0], "signature version")
    if version > key.latest_version:
        raise VaultError(400, "invalid signature: version is too new")
    if version < key.min_decryption_version or version not in key.versions:
        raise VaultError(400, "ciphertext or signature version is disallowed by policy (too old)")
    der = _unmarshal(fields[1], marshaling)
    public = key.versions[version].private_key.public_key()
    try:
        public.verify(der, digest, _prehashed(digest))
    except InvalidSignature:
        return False
    return True


def _unmarshal(text: str, marshaling: str) -> bytes:
    try:
        if marshaling == "asn1":
            der = base64.b64decode(text, validate=True)
            decode_dss_signature(der)  # raises on malformed DER
            return der
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise VaultError(400, "supplied signature is invalid") from None
    half = len(raw) // 2
    return encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


def _export(kind: str, key: TransitKey, version: str) -> dict[str, Any]:
    if kind not in ("encryption-key", "signing-key", "hmac-key", "public-key"):
        raise VaultError(400, f"invalid export type: {kind}")
    if not key.exportable and kind != "public-key":
        raise VaultError(400, "private key material is not exportable")
    if kind != "signing-key" and kind != "public-key":
        raise VaultError(400, f"{kind} export is not implemented by the test server")
    if not version:
        chosen = sorted(key.versions)
    else:
        number = key.latest_version if version == "latest" else _int(version.lstrip("v"), "version")
        if number < key.min_decryption_version:
            raise VaultError(400, "version for export is below minimum decryption version")
        if number not in key.versions:
            raise VaultError(400, "version does not exist or cannot be found")
        chosen = [number]
    return {
        "name": key.name,
        "type": key.type,
        "keys": {str(v): _pem(key, v, kind) for v in chosen},
    }


def _pem(key: TransitKey, version: int, kind: str) -> str:
    if kind == "public-key":
        return key.public_pem(version).strip()
    pem = key.versions[version].private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # Go's MarshalECPrivateKey: SEC1
        serialization.NoEncryption(),
    )
    return pem.decode("ascii").strip()


class _Handler(BaseHTTPRequestHandler):
    vault: VaultTransitServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        token = self.headers.get("X-Vault-Token", "")
        try:
            status, payload = self.vault.handle(method, self.path, self._body(), token)
        except VaultError as exc:
            status, payload = exc.status, {"errors": exc.errors}
        data = b"" if status == 204 else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise VaultError(400, f"failed to parse JSON input: {exc}") from None
        if not isinstance(body, dict):
            raise VaultError(400, "failed to parse JSON input: not an object")
        return body

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


@pytest.fixture
def vault_server() -> Iterator[VaultTransitServer]:
    """A fresh, unsealed Vault test server with an empty transit mount."""
    with VaultTransitServer() as server:
        yield server
