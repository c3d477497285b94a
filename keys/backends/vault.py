"""HashiCorp Vault transit key backend (SPEC sections 5, 6, 9 and 11).

Keys are transit keys of type ``ecdsa-p256`` (or p384/p521), created with
``exportable=false`` and ``allow_plaintext_backup=false``; the private half never
leaves Vault. A ``key_ref`` is ``{"name": ..., "version": N, "mount": ...}``: it pins
one key version, and every signature is made with exactly that version. Nothing here
signs with "the latest version": after a rotation, other tools that do not pin quietly
start signing with a key verifiers do not know yet; this backend never does.

Signing: the PAE is hashed here with the curve's hash (SHA-256 for P-256, as
``model_signing`` expects) and Vault signs the digest (``prehashed=true``,
``hash_algorithm`` naming the same hash, ``marshaling_algorithm=asn1`` so Vault returns
DER). The answer ``vault:vN:<base64>`` must carry the pinned N, and each signature is
verified here against the public key this process first read for that version, so a
key deleted and re-created under the same name cannot sign in the old key's name.

Rotation (:meth:`VaultTransitBackend.rotate`, explicit only) adds version N and raises
``min_encryption_version`` to N: older versions still verify but can no longer sign.
Vault reports a signing request for a version below ``min_encryption_version`` as HTTP
500 (hashicorp/vault#20713); it is mapped to :class:`KeyNotUsable`, not to an outage.

Failures: unreachable, sealed, uninitialised, rate-limited or failing Vault and refused
credentials raise :class:`BackendUnavailable` (callers wait or fail; never another key);
missing keys, bad versions and keys that are exportable, backed up in plaintext or of
the wrong type raise :class:`KeyNotUsable`. Messages never contain the token, the
AppRole secret_id or anything Vault echoed that contains them.

Authentication: a token, or AppRole (``role_id`` + ``secret_id``), logged in lazily on
first use and once more when Vault answers 403 (expired or revoked token). The token is
never taken from ``VAULT_TOKEN`` or ``~/.vault-token`` implicitly (hvac would): pass it,
e.g. via :func:`token_from_file`. Two credentials, two backend objects
(:mod:`keys.registry`): signing needs ``update`` on ``sign/<key>`` (and ``verify/<key>``)
and ``read`` on ``keys/<key>`` (deploy/vault/modelsign-policy.hcl); key ceremonies
(:meth:`~VaultTransitBackend.ceremony_key`) need ``read``, ``create`` and ``update`` on
``keys/<key>``, ``update`` on ``keys/<key>/rotate`` and on ``keys/<key>/config``, and
nothing to sign (deploy/vault/modelsign-ceremony-policy.hcl). Both need ``read`` on
``auth/token/lookup-self`` for :meth:`~VaultTransitBackend.health`, which Vault's default
policy grants.

Fork safety: the HTTP session (hvac's ``requests`` session and its pooled sockets) is
per process; a forked child builds its own on first use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hvac
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from hvac import exceptions as hv

from keys.backends.base import (
    BackendUnavailable,
    GeneratedKey,
    Health,
    KeyBackend,
    KeyBackendError,
    KeyNotUsable,
    KeyRef,
)

T = TypeVar("T")

#: Largest token file accepted by :func:`token_from_file`.
MAX_TOKEN_FILE_BYTES = 4096
#: Vault's ``framework.GenericNameRegex``: also keeps names from escaping the URL path.
_NAME_RE = re.compile(r"^\w(?:[\w.@-]*\w)?$")


@dataclass(frozen=True)
class _Curve:
    algorithm: str
    key_type: str  # Vault transit key type
    ec_curve: type[ec.EllipticCurve]
    vault_hash: str  # Vault's name of the hash that model_signing pairs with the curve
    hash_fn: Callable[[bytes], Any]
    hash_cls: type[hashes.HashAlgorithm]


_CURVES: dict[str, _Curve] = {
    c.algorithm: c
    for c in (
        _Curve("ECDSA-P256", "ecdsa-p256", ec.SECP256R1, "sha2-256", hashlib.sha256, hashes.SHA256),
        _Curve("ECDSA-P384", "ecdsa-p384", ec.SECP384R1, "sha2-384", hashlib.sha384, hashes.SHA384),
        _Curve("ECDSA-P521", "ecdsa-p521", ec.SECP521R1, "sha2-512", hashlib.sha512, hashes.SHA512),
    )
}
_CURVE_BY_TYPE = {c.key_type: c for c in _CURVES.values()}


def _curve_for(algorithm: str) -> _Curve:
    try:
        return _CURVES[algorithm]
    except KeyError:
        raise KeyNotUsable(
            f"unsupported algorithm {algorithm!r}; use one of {', '.join(_CURVES)}"
        ) from None


@dataclass(frozen=True)
class _Ref:
    mount: str
    name: str
    version: int

    def as_ref(self) -> KeyRef:
        return {"name": self.name, "version": self.version, "mount": self.mount}

    def describe(self) -> str:
        return f"transit key {self.name!r} version {self.version} (mount {self.mount!r})"


@dataclass(frozen=True)
class _Loaded:
    """A pinned version as read from Vault, with the checks that passed."""

    curve: _Curve
    public_key: ec.EllipticCurvePublicKey
    facts: dict[str, Any]


class _Secret:
    """Holds a credential so that reprs, tracebacks and debug pages never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret hidden>"


class VaultTransitBackend(KeyBackend):
    """Keys in one transit mount of one Vault, each signature pinned to one key version."""

    name = "vault"

    def __init__(
        self,
        address: str,
        mount: str = "transit",
        token: str | None = None,
        *,
        role_id: str | None = None,
        secret_id: str | None = None,
        timeout: float = 10,
        verify: bool | str = True,
    ) -> None:
        if not address:
            raise ValueError("the Vault address is required")
        self.address = address.rstrip("/")
        self.mount = mount.strip("/")
        if not self.mount:
            raise ValueError("the transit mount path is required")
        if bool(token) == bool(role_id or secret_id):
            raise ValueError("give either a Vault token or AppRole role_id and secret_id")
        if not token and not (role_id and secret_id):
            raise ValueError("AppRole login needs both role_id and secret_id")
        self._token = _Secret(token or "")
        self._role_id = role_id
        self._secret_id = _Secret(secret_id or "")
        self.timeout = timeout
        self.verify = verify
        self._lock = threading.Lock()
        self._client: hvac.Client | None = None
        self._pid = 0
        #: Pinned version -> what was read for it; its public key is never replaced.
        self._loaded: dict[_Ref, _Loaded] = {}

    def __repr__(self) -> str:
        return f"VaultTransitBackend(address={self.address!r}, mount={self.mount!r})"

    @property
    def uses_approle(self) -> bool:
        return self._role_id is not None

    # -- public API ---------------------------------------------------------------------

    def generate(self, label: str, algorithm: str = "ECDSA-P256") -> GeneratedKey:
        """Create a non-exportable transit key named ``label``; refuse a name in use."""
        curve = _curve_for(algorithm)
        ref = _Ref(self.mount, _check_name(label), 1)
        if self._read_key(ref.name, missing_ok=True) is not None:
            raise KeyNotUsable(
                f"a transit key named {label!r} already exists in mount {self.mount!r} on {self._where()}"
            )
        created = self._call(
            f"create {ref.describe()}",
            lambda c: c.secrets.transit.create_key(
                name=ref.name,
                key_type=curve.key_type,
                exportable=False,
                allow_plaintext_backup=False,
                mount_point=ref.mount,
            ),
        )
        # Vault upserts: a key created by someone else meanwhile only shows as a warning.
        if isinstance(created, Mapping) and any(
            "already existed" in str(w) for w in created.get("warnings") or []
        ):
            raise KeyNotUsable(
                f"a transit key named {label!r} already exists in mount {self.mount!r} on {self._where()}"
            )
        loaded = self._load(ref, expected=curve)
        return GeneratedKey(
            key_ref=ref.as_ref(), public_key=loaded.public_key, attributes=dict(loaded.facts)
        )

    def rotate(self, key_ref: KeyRef) -> KeyRef:
        """Add version N, make it the lowest version allowed to sign; return its key_ref.

        Older versions still verify (``min_decryption_version`` is left alone).
        """
        ref = self._parse_ref(key_ref)
        rotated = self._call(
            f"rotate {ref.describe()}",
            lambda c: c.secrets.transit.rotate_key(name=ref.name, mount_point=ref.mount),
            ref,
        )
        data = rotated.get("data") if isinstance(rotated, Mapping) else None
        if not isinstance(data, Mapping):  # Vault before 1.13 answered 204
            data = self._read_key(ref.name) or {}
        new = _Ref(ref.mount, ref.name, _version(data.get("latest_version")))
        try:
            self._call(
                f"raise min_encryption_version of {new.describe()}",
                lambda c: c.secrets.transit.update_key_configuration(
                    name=new.name, min_encryption_version=new.version, mount_point=new.mount
                ),
                new,
            )
        except KeyBackendError as exc:
            raise type(exc)(
                f"{ref.name!r} was rotated to version {new.version} but its "
                f"min_encryption_version could not be raised ({exc}); older versions can "
                "still sign: retry the configuration, do not rotate again"
            ) from None
        self._load(new)
        return new.as_ref()

    def ceremony_key(
        self, name: str, algorithm: str, *, pinned: bool
    ) -> tuple[GeneratedKey, dict[str, Any]]:
        """The version of transit key ``name`` that a completed key ceremony pins.

        * No key of that name: create it (non-exportable, no plaintext backup); its version 1
          is generated now, at the quorum. ``case`` is ``created``.
        * A key no ``SigningKey`` pins yet (``pinned`` false; e.g. deploy/vault/setup.py made
          it): check it, then rotate it, so the version pinned is generated now, at the
          quorum, and the versions made before can no longer sign. ``case`` is ``adopted``.
        * A key earlier keys pinned: rotate it (:meth:`rotate`). ``case`` is ``rotated``.

        A key of another type, exportable or allowing plaintext backup is refused before
        anything is changed; so is a pinned key that is gone (deleted and maybe re-created:
        its versions would not be the ones on record). Returns the key and, for the audit
        transcript, what happened.
        """
        curve = _curve_for(algorithm)
        name = _check_name(name)
        where = f"transit key {name!r} in mount {self.mount!r} on {self._where()}"
        existing = self._read_key(name, missing_ok=True)
        if existing is None:
            if pinned:
                raise KeyNotUsable(
                    f"{where} does not exist, but keys on record pin it: it was deleted or "
                    "renamed; a key of that name made now would not be the one on record. "
                    "Nothing was changed"
                )
            generated = self.generate(name, algorithm)
            return generated, self._ceremony_facts("created", generated.key_ref, None)
        problems = _policy_problems(existing, curve)
        if problems:
            raise KeyNotUsable(
                f"{where} exists but is not usable: {'; '.join(problems)}. Nothing was changed "
                "and nothing recorded; these flags can never be unset, so ask the Vault "
                "administrator for a new key (or set VAULT_KEY_<AUTHORITY> to another name)"
            )
        before = _version(existing.get("latest_version"), default=0)
        ref = self.rotate({"name": name, "version": max(before, 1), "mount": self.mount})
        loaded = self._load(self._parse_ref(ref), expected=curve, for_signing=True)
        generated = GeneratedKey(
            key_ref=ref, public_key=loaded.public_key, attributes=dict(loaded.facts)
        )
        return generated, self._ceremony_facts("rotated" if pinned else "adopted", ref, before)

    def _ceremony_facts(self, case: str, ref: KeyRef, before: int | None) -> dict[str, Any]:
        return {
            "case": case,
            "vault_address": self.address,
            "mount": self.mount,
            "transit_key": ref["name"],
            "version": ref["version"],
            "latest_version_before": before,
            "credential": "approle" if self.uses_approle else "token",
        }

    def public_key(self, key_ref: KeyRef) -> ec.EllipticCurvePublicKey:
        return self._load(self._parse_ref(key_ref)).public_key

    def check_usable(self, key_ref: KeyRef) -> dict[str, Any]:
        """Re-read the key from Vault and check it; return the checked fields for the audit."""
        ref = self._parse_ref(key_ref)
        # An optional "algorithm" in key_ref (e.g. from the SigningKey row) must match too.
        expected = _curve_for(key_ref["algorithm"]) if "algorithm" in key_ref else None
        return dict(self._load(ref, expected=expected, for_signing=True).facts)

    def sign(self, key_ref: KeyRef, pae_bytes: bytes) -> bytes:
        ref = self._parse_ref(key_ref)
        loaded = self._loaded.get(ref) or self._load(ref)
        digest = loaded.curve.hash_fn(pae_bytes).digest()
        answer = self._call(
            f"sign with {ref.describe()}",
            lambda c: c.secrets.transit.sign_data(
                name=ref.name,
                hash_input=base64.b64encode(digest).decode("ascii"),
                key_version=ref.version,
                hash_algorithm=loaded.curve.vault_hash,
                prehashed=True,
                marshaling_algorithm="asn1",
                mount_point=ref.mount,
            ),
            ref,
        )
        der = self._parse_signature(answer, ref)
        try:
            loaded.public_key.verify(der, digest, ec.ECDSA(Prehashed(loaded.curve.hash_cls())))
        except InvalidSignature:
            raise KeyNotUsable(
                f"Vault's signature with {ref.describe()} does not verify with the public key "
                "this process read for that version: the key was deleted and re-created or "
                "Vault misbehaves; refusing to use it"
            ) from None
        return der

    def health(self) -> Health:
        try:
            return self._health()
        except KeyBackendError as exc:
            return Health(ok=False, detail=str(exc))
        except Exception as exc:  # health() is polled by monitoring and must never raise
            return Health(ok=False, detail=self._scrub(f"unexpected error: {_describe(exc)}"))

    # -- key reading and checks ---------------------------------------------------------

    def _read_key(self, name: str, *, missing_ok: bool = False) -> Mapping[str, Any] | None:
        def read(client: hvac.Client) -> Any:
            try:
                return client.secrets.transit.read_key(name=name, mount_point=self.mount)
            except hv.InvalidPath:  # Vault: 404 with an empty errors list
                return None

        answer = self._call(f"read transit key {name!r}", read, _Ref(self.mount, name, 0))
        if answer is None:
            if missing_ok:
                return None
            raise KeyNotUsable(
                f"no transit key {name!r} in mount {self.mount!r} on {self._where()}"
            )
        data = answer.get("data") if isinstance(answer, Mapping) else None
        if not isinstance(data, Mapping):
            raise BackendUnavailable(f"{self._where()} sent an unreadable answer for key {name!r}")
        return data

    def _load(
        self, ref: _Ref, *, expected: _Curve | None = None, for_signing: bool = False
    ) -> _Loaded:
        data = self._read_key(ref.name)
        assert data is not None
        curve, public_key, facts = self._check(ref, data, expected, for_signing)
        cached = self._loaded.get(ref)
        if cached is not None and _spki(cached.public_key) != _spki(public_key):
            raise KeyNotUsable(
                f"the public key of {ref.describe()} changed since this process first read "
                "it: the key was deleted and re-created; refusing to use it"
            )
        loaded = _Loaded(curve, public_key, facts)
        self._loaded[ref] = loaded
        return loaded

    def _check(
        self,
        ref: _Ref,
        data: Mapping[str, Any],
        expected: _Curve | None,
        for_signing: bool,
    ) -> tuple[_Curve, ec.EllipticCurvePublicKey, dict[str, Any]]:
        problems = _policy_problems(data, expected)
        entry = (data.get("keys") or {}).get(str(ref.version))
        problems += _version_problems(ref.version, data, entry, for_signing)
        curve = _CURVE_BY_TYPE.get(str(data.get("type")))
        public_key = None
        if curve is not None and isinstance(entry, Mapping):
            public_key, problem = _parse_public_key(entry.get("public_key"), curve)
            problems += [problem] if problem else []
        if problems or curve is None or public_key is None or not isinstance(entry, Mapping):
            raise KeyNotUsable(
                f"{ref.describe()} on {self._where()} is not usable: " + "; ".join(problems)
            )
        return curve, public_key, self._facts(ref, data, entry, public_key)

    def _facts(
        self,
        ref: _Ref,
        data: Mapping[str, Any],
        entry: Mapping[str, Any],
        public_key: ec.EllipticCurvePublicKey,
    ) -> dict[str, Any]:
        facts = {k: data.get(k) for k in _AUDITED}
        facts.update(
            vault_address=self.address,
            mount=ref.mount,
            name=ref.name,
            version=ref.version,
            creation_time=entry.get("creation_time"),
            public_key_sha256=hashlib.sha256(_spki(public_key)).hexdigest(),
        )
        return facts

    def _parse_signature(self, answer: Any, ref: _Ref) -> bytes:
        data = answer.get("data") if isinstance(answer, Mapping) else None
        text = data.get("signature") if isinstance(data, Mapping) else None
        parts = text.split(":", 2) if isinstance(text, str) else []
        if len(parts) != 3 or parts[0] != "vault" or not parts[1].startswith("v"):
            raise BackendUnavailable(
                f"{self._where()} sent no usable signature for {ref.describe()}"
            )
        if parts[1] != f"v{ref.version}":
            raise KeyNotUsable(
                f"{self._where()} signed with key version {parts[1][1:]!r}, not the pinned "
                f"version {ref.version} of {ref.name!r}"
            )
        try:
            der = base64.b64decode(parts[2], validate=True)
            decode_dss_signature(der)  # DER, as asked with marshaling_algorithm=asn1
        except (binascii.Error, ValueError):
            raise BackendUnavailable(
                f"{self._where()} sent a malformed signature for {ref.describe()}"
            ) from None
        return der

    def _parse_ref(self, key_ref: KeyRef) -> _Ref:
        if not isinstance(key_ref, Mapping):
            raise KeyNotUsable("key_ref must be a mapping with name, version and mount")
        mount = key_ref.get("mount", self.mount)
        if mount != self.mount:
            raise KeyNotUsable(
                f"key_ref is for transit mount {mount!r}; this backend uses {self.mount!r}"
            )
        version = key_ref.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            # Never 0 or absent: Vault would read that as "latest", the very thing we avoid.
            raise KeyNotUsable(f"key_ref must pin a key version >= 1, got {version!r}")
        return _Ref(self.mount, _check_name(key_ref.get("name")), version)

    # -- health -------------------------------------------------------------------------

    def _health(self) -> Health:
        answer = self._call(
            "read health", lambda c: c.sys.read_health_status(method="GET"), auth=False
        )
        status = 200 if isinstance(answer, Mapping) else getattr(answer, "status_code", 0)
        if status == 503:
            return Health(ok=False, detail=f"Vault at {self.address} is sealed")
        if status == 501:
            return Health(ok=False, detail=f"Vault at {self.address} is not initialized")
        if status not in (200, 429, 473):  # active, standby, performance standby
            return Health(
                ok=False, detail=f"Vault at {self.address} answered {status} to sys/health"
            )
        self._call("look up the token", lambda c: c.auth.token.lookup_self())
        role = "active" if status == 200 else "standby (requests are forwarded)"
        return Health(
            ok=True,
            detail=f"Vault at {self.address} is unsealed and {role}; token accepted; "
            f"transit mount {self.mount!r}",
        )

    # -- the client, authentication and error mapping -----------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[[hvac.Client], T],
        ref: _Ref | None = None,
        *,
        auth: bool = True,
    ) -> T:
        """Run ``fn`` with a logged-in client; map every failure to a backend error."""
        try:
            client = self._ensure_client(login=auth)
            try:
                return fn(client)
            except hv.Forbidden:
                if not (auth and self.uses_approle):
                    raise
                # An expired or revoked AppRole token: log in again, once.
                return fn(self._ensure_client(login=True, relogin=True))
        except KeyBackendError:
            raise
        except (hv.VaultError, requests.exceptions.RequestException) as exc:
            raise self._map_error(exc, what, ref) from None

    def _ensure_client(self, *, login: bool, relogin: bool = False) -> hvac.Client:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                # Never reuse a parent's session after fork: its pooled sockets are shared.
                self._client = hvac.Client(
                    url=self.address,
                    token=self._token.reveal() or "",  # "" (not None): no VAULT_TOKEN lookup
                    timeout=self.timeout,
                    verify=self.verify,
                )
                self._pid = os.getpid()
            if login and self.uses_approle and (relogin or not self._client.token):
                self._login(self._client)
            return self._client

    def _login(self, client: hvac.Client) -> None:
        try:
            client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id.reveal())
        except (hv.InvalidRequest, hv.Forbidden, hv.Unauthorized, hv.InvalidPath) as exc:
            raise BackendUnavailable(
                f"AppRole login to Vault at {self.address} failed "
                f"({self._vault_errors(exc)}); check role_id and secret_id"
            ) from None

    def _map_error(self, exc: Exception, what: str, ref: _Ref | None) -> KeyBackendError:
        where, text = self._where(), self._vault_errors(exc)
        if isinstance(exc, requests.exceptions.RequestException):
            return BackendUnavailable(
                f"cannot reach Vault at {self.address} to {what}: {self._network_error(exc)}"
            )
        if isinstance(exc, hv.VaultDown) and "sealed" in text.lower():
            return BackendUnavailable(f"Vault at {self.address} is sealed")
        if isinstance(exc, hv.VaultNotInitialized):
            return BackendUnavailable(f"Vault at {self.address} is not initialized")
        if isinstance(exc, hv.Forbidden | hv.Unauthorized):
            return BackendUnavailable(
                f"Vault at {self.address} refused authentication to {what} ({text}); "
                "check the token or AppRole credentials and the token's policy"
            )
        name = repr(ref.name) if ref else "?"
        if ref and (isinstance(exc, hv.InvalidPath) or _says_missing(text)):
            return KeyNotUsable(f"no transit key {name} in mount {self.mount!r} on {where}")
        if isinstance(exc, hv.InvalidRequest | hv.InternalServerError) and "version" in text:
            # Includes Vault's HTTP 500 for signing below min_encryption_version (#20713).
            return KeyNotUsable(f"{where} refused to {what}: {text}")
        if isinstance(exc, hv.InvalidRequest):
            return KeyNotUsable(f"{where} rejected the request to {what}: {text}")
        return BackendUnavailable(
            f"Vault at {self.address} failed to {what} ({type(exc).__name__}: {text})"
        )

    def _network_error(self, exc: requests.exceptions.RequestException) -> str:
        if isinstance(exc, requests.exceptions.SSLError):
            return "TLS error (check the CA bundle given as verify)"
        if isinstance(exc, requests.exceptions.Timeout):
            return f"no answer within {self.timeout}s"
        # requests nests the OS error deep in its text; keep just "[Errno N] reason".
        match = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
        return f"connection failed: {match.group(0).strip()}" if match else type(exc).__name__

    def _vault_errors(self, exc: Exception) -> str:
        """Vault's own error text, without Go's multierror decoration or any secret."""
        errors = getattr(exc, "errors", None)
        if not errors:  # no JSON errors list: hvac passes the response text instead
            detail = str(exc.args[0]).strip()[:200] if exc.args and exc.args[0] else ""
            return self._scrub(detail or "no details")
        lines = [ln.strip().lstrip("* ") for e in errors for ln in str(e).splitlines()]
        text = "; ".join(ln for ln in lines if ln and not re.match(r"^\d+ errors? occurred:$", ln))
        return self._scrub(text or "no details")

    def _scrub(self, text: str) -> str:
        client_token = getattr(self._client, "token", None) or ""
        for secret in (self._token.reveal(), self._secret_id.reveal(), client_token):
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    def _where(self) -> str:
        return f"Vault at {self.address}"


_AUDITED = (
    "type",
    "exportable",
    "allow_plaintext_backup",
    "deletion_allowed",
    "derived",
    "latest_version",
    "min_available_version",
    "min_decryption_version",
    "min_encryption_version",
)


def _policy_problems(data: Mapping[str, Any], expected: _Curve | None) -> list[str]:
    problems: list[str] = []
    key_type = data.get("type")
    if key_type not in _CURVE_BY_TYPE:
        problems.append(f"type is {key_type!r} (must be one of {', '.join(_CURVE_BY_TYPE)})")
    elif expected is not None and key_type != expected.key_type:
        problems.append(f"type is {key_type!r} (must be {expected.key_type!r})")
    for flag in ("exportable", "allow_plaintext_backup"):
        if data.get(flag) is not False:
            problems.append(f"{flag} is {str(data.get(flag)).lower()} (must be false)")
    if data.get("supports_signing") is False:
        problems.append("supports_signing is false")
    return problems


def _version_problems(
    version: int, data: Mapping[str, Any], entry: Any, for_signing: bool
) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"version {version} does not exist (latest is {data.get('latest_version')})"]
    problems: list[str] = []
    min_available = _version(data.get("min_available_version"), default=0)
    if version < min_available:
        problems.append(f"version {version} is below min_available_version {min_available}")
    min_encryption = _version(data.get("min_encryption_version"), default=0)
    if for_signing and version < min_encryption:
        problems.append(
            f"version {version} is below min_encryption_version {min_encryption}: Vault "
            "refuses to sign with it (the key was rotated)"
        )
    return problems


def _parse_public_key(pem: Any, curve: _Curve) -> tuple[ec.EllipticCurvePublicKey | None, str]:
    try:
        key = serialization.load_pem_public_key(str(pem).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None, "its public key is not a PEM public key"
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve.ec_curve):
        return None, f"its public key is not on the curve of {curve.key_type}"
    return key, ""


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _version(value: Any, *, default: int | None = None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if default is not None and value is None:
        return default
    raise BackendUnavailable(f"Vault sent an unreadable key version {value!r}")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KeyNotUsable(
            f"transit key names are letters, digits, '_', '-', '.' and '@', got {name!r}"
        )
    return name


def _says_missing(text: str) -> bool:
    # Vault answers 400 (not 404) for sign/rotate/config of a missing key.
    return any(
        s in text for s in ("key not found", "no existing key named", "signing key not found")
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- token files -------------------------------------------------------------------------


def token_from_file(path: str | os.PathLike[str]) -> str:
    """Read a Vault token from a file (e.g. a mounted Kubernetes secret).

    One trailing newline (LF or CRLF) is stripped. A missing, unreadable, empty or
    oversized file, or a token with whitespace or control characters inside, raises
    :class:`BackendUnavailable` with a message that never contains the token.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_TOKEN_FILE_BYTES:
            raise BackendUnavailable(
                f"Vault token file {p} is larger than {MAX_TOKEN_FILE_BYTES} bytes"
            )
        data = p.read_bytes()
    except FileNotFoundError:
        raise BackendUnavailable(f"Vault token file {p} does not exist") from None
    except OSError as exc:
        raise BackendUnavailable(f"cannot read Vault token file {p}: {exc.strerror}") from None
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    try:
        token = data.decode("ascii")
    except UnicodeDecodeError:
        raise BackendUnavailable(f"Vault token file {p} is not ASCII") from None
    if not token:
        raise BackendUnavailable(f"Vault token file {p} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise BackendUnavailable(
            f"Vault token file {p} has whitespace or control characters in the token"
        )
    return token
