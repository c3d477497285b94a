"""The signing policy file (SPEC section 3): loaded once, validated strictly, fail closed.

Unknown fields are errors, not ignored: a misspelt ``requires_aproval`` must never turn
approval off. Every error names the field path and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

KEY_ALGORITHMS = ("ECDSA-P256", "ECDSA-P384", "ECDSA-P521")
KEY_STORAGE_BACKENDS = {"HSM": "pkcs11", "vault": "vault"}
_ROTATION_WORDS = {"annual": 365, "quarterly": 91, "monthly": 30}
_AUTHORITY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
#: The authority name of the audit checkpoint key (see signing_service.audit_checkpoints). It
#: is reserved: a signing authority of that name would let model requests reach that key.
CHECKPOINT_AUTHORITY = "audit-checkpoint"
RESERVED_AUTHORITIES = frozenset({CHECKPOINT_AUTHORITY})


class PolicyError(ValueError):
    """The policy file is invalid; the message names the field and the problem."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Authority:
    name: str
    type: str  # "key-based" or "keyless"
    backend: str  # "pkcs11", "vault" or "sigstore"
    key_algorithm: str
    key_rotation: timedelta
    authorized_signers: tuple[str, ...]
    requires_approval: bool
    approval_count: int
    #: Globs on SLSA builder ids whose provenance this authority signs; empty: none.
    provenance_builders: tuple[str, ...] = ()

    def allows_signer(self, identity: str) -> bool:
        """Shell-style globs, case-sensitive, matched against the whole identity."""
        return any(fnmatchcase(identity, pattern) for pattern in self.authorized_signers)

    def allows_builder(self, builder_id: str) -> bool:
        """Shell-style globs, case-sensitive, matched against the whole SLSA builder id."""
        return any(fnmatchcase(builder_id, pattern) for pattern in self.provenance_builders)


@dataclass(frozen=True)
class VerificationRule:
    name: str
    require_signature: bool
    accepted_authorities: tuple[str, ...]
    require_provenance: bool
    max_signature_age_days: int | None


@dataclass(frozen=True)
class KeyManagement:
    ceremony_quorum: int = 2
    rotation_lead_days: int = 30
    transition_days: int = 30
    approval_ttl_hours: int = 72


@dataclass(frozen=True)
class Policy:
    version: str
    #: SHA-256 of the file's bytes: the policy version approvals are bound to.
    digest: str
    authorities: Mapping[str, Authority]
    verification: Mapping[str, VerificationRule]
    key_management: KeyManagement

    def authority(self, name: str) -> Authority | None:
        return self.authorities.get(name)


def load_policy(path: Path) -> Policy:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError("SIGNING_POLICY_FILE", f"cannot read {path}: {exc.strerror}") from None
    return parse_policy(raw)


def parse_policy(raw: bytes) -> Policy:
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PolicyError("(file)", f"not valid YAML: {exc}") from None
    root = _mapping(doc, "(file)", required={"certificate_policy"})
    cp = _mapping(
        root["certificate_policy"],
        "certificate_policy",
        required={"version", "signing_authorities"},
        optional={"verification_policy", "key_management"},
    )
    version = _string(cp["version"], "certificate_policy.version")
    authorities = _authorities(cp["signing_authorities"])
    verification = _verification(cp.get("verification_policy", {}), authorities)
    km = _key_management(cp.get("key_management", {}))
    return Policy(
        version=version,
        digest=hashlib.sha256(raw).hexdigest(),
        authorities=authorities,
        verification=verification,
        key_management=km,
    )


# --- sections --------------------------------------------------------------------------


def _authorities(node: object) -> dict[str, Authority]:
    where = "certificate_policy.signing_authorities"
    items = _mapping(node, where)
    if not items:
        raise PolicyError(where, "declares no signing authority")
    out: dict[str, Authority] = {}
    for name, body in items.items():
        if not isinstance(name, str) or not _AUTHORITY_NAME.fullmatch(name):
            raise PolicyError(f"{where}.{name}", "authority names are lowercase a-z, 0-9, - and _")
        if name in RESERVED_AUTHORITIES:
            raise PolicyError(
                f"{where}.{name}",
                "is reserved for the audit checkpoint key and cannot be a signing authority",
            )
        out[name] = _authority(name, body, f"{where}.{name}")
    return out


def _authority(name: str, node: object, where: str) -> Authority:
    kind = _mapping(node, where, required={"type"}, optional=None)["type"]
    if kind == "key-based":
        return _key_based(name, node, where)
    if kind == "keyless":
        return _keyless(name, node, where)
    raise PolicyError(f"{where}.type", f"must be key-based or keyless, got {kind!r}")


def _key_based(name: str, node: object, where: str) -> Authority:
    body = _mapping(
        node,
        where,
        required={
            "type",
            "key_storage",
            "key_algorithm",
            "authorized_signers",
            "requires_approval",
        },
        optional={"key_rotation", "approval_count", "provenance_builders"},
    )
    storage = body["key_storage"]
    if storage not in KEY_STORAGE_BACKENDS:
        raise PolicyError(f"{where}.key_storage", f"must be HSM or vault, got {storage!r}")
    algorithm = body["key_algorithm"]
    if algorithm not in KEY_ALGORITHMS:
        raise PolicyError(
            f"{where}.key_algorithm",
            f"must be one of {', '.join(KEY_ALGORITHMS)}, got {algorithm!r}",
        )
    requires_approval = _bool(body["requires_approval"], f"{where}.requires_approval")
    return Authority(
        name=name,
        type="key-based",
        backend=KEY_STORAGE_BACKENDS[storage],
        key_algorithm=algorithm,
        key_rotation=_rotation(body.get("key_rotation", "annual"), f"{where}.key_rotation"),
        authorized_signers=_patterns(body["authorized_signers"], f"{where}.authorized_signers"),
        requires_approval=requires_approval,
        approval_count=_approval_count(body, requires_approval, where),
        provenance_builders=_builders(body.get("provenance_builders"), where),
    )


def _keyless(name: str, node: object, where: str) -> Authority:
    body = _mapping(
        node,
        where,
        required={"type", "provider", "allowed_identities", "requires_approval"},
        optional={"identity_provider", "approval_count", "provenance_builders"},
    )
    if "provenance_builders" in body:
        raise PolicyError(
            f"{where}.provenance_builders",
            "keyless authorities do not sign provenance; use a key-based authority",
        )
    if body["provider"] != "sigstore":
        raise PolicyError(f"{where}.provider", f"must be sigstore, got {body['provider']!r}")
    if "identity_provider" in body:
        _string(body["identity_provider"], f"{where}.identity_provider")
    requires_approval = _bool(body["requires_approval"], f"{where}.requires_approval")
    if requires_approval:
        # The caller's identity token lives minutes; approvals can take days.
        raise PolicyError(
            f"{where}.requires_approval",
            "keyless authorities sign while the request is made and cannot wait for approval",
        )
    return Authority(
        name=name,
        type="keyless",
        backend="sigstore",
        key_algorithm="ECDSA-P256",
        key_rotation=timedelta(0),
        authorized_signers=_patterns(body["allowed_identities"], f"{where}.allowed_identities"),
        requires_approval=requires_approval,
        approval_count=_approval_count(body, requires_approval, where),
    )


def _approval_count(body: Mapping[str, Any], requires_approval: bool, where: str) -> int:
    if not requires_approval:
        if "approval_count" in body and body["approval_count"] not in (0, None):
            raise PolicyError(f"{where}.approval_count", "is set but requires_approval is false")
        return 0
    # Two people is the point of approval; a missing count must not mean one.
    count = body.get("approval_count", 2)
    return _int(count, f"{where}.approval_count", minimum=1, maximum=10)


def _verification(
    node: object, authorities: Mapping[str, Authority]
) -> dict[str, VerificationRule]:
    where = "certificate_policy.verification_policy"
    out: dict[str, VerificationRule] = {}
    for name, body in _mapping(node, where).items():
        w = f"{where}.{name}"
        rule = _mapping(
            body,
            w,
            required={"require_signature", "accepted_authorities"},
            optional={"require_provenance", "max_signature_age_days"},
        )
        accepted = _string_list(rule["accepted_authorities"], f"{w}.accepted_authorities")
        for i, auth in enumerate(accepted):
            if auth not in authorities:
                raise PolicyError(f"{w}.accepted_authorities[{i}]", f"unknown authority {auth!r}")
        age = rule.get("max_signature_age_days")
        out[name] = VerificationRule(
            name=name,
            require_signature=_bool(rule["require_signature"], f"{w}.require_signature"),
            accepted_authorities=tuple(accepted),
            require_provenance=_bool(
                rule.get("require_provenance", False), f"{w}.require_provenance"
            ),
            max_signature_age_days=None
            if age is None
            else _int(age, f"{w}.max_signature_age_days", minimum=1, maximum=36500),
        )
    return out


def _key_management(node: object) -> KeyManagement:
    where = "certificate_policy.key_management"
    fields = {"ceremony_quorum", "rotation_lead_days", "transition_days", "approval_ttl_hours"}
    body = _mapping(node, where, optional=fields)
    defaults = KeyManagement()
    limits = {
        "ceremony_quorum": (2, 10),
        "rotation_lead_days": (1, 365),
        "transition_days": (0, 365),
        "approval_ttl_hours": (1, 24 * 90),
    }
    values = {
        key: _int(body.get(key, getattr(defaults, key)), f"{where}.{key}", minimum=lo, maximum=hi)
        for key, (lo, hi) in limits.items()
    }
    return KeyManagement(**values)


# --- scalars ---------------------------------------------------------------------------


def _mapping(
    node: object,
    where: str,
    *,
    required: set[str] | frozenset[str] = frozenset(),
    optional: set[str] | frozenset[str] | None = frozenset(),
) -> dict[str, Any]:
    """A mapping with the required keys and, unless ``optional`` is None, no others."""
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise PolicyError(where, f"must be a mapping, got {type(node).__name__}")
    for key in sorted(required - set(node)):
        raise PolicyError(f"{where}.{key}", "is required")
    if optional is not None and (required or optional):
        for key in sorted(set(node) - required - optional, key=str):
            raise PolicyError(f"{where}.{key}", "is not a known field")
    return node


def _string(value: object, where: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(where, "must be a non-empty string")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(where, f"must be true or false, got {value!r}")
    return value


def _int(value: object, where: str, *, minimum: int, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PolicyError(where, f"must be a whole number, got {value!r}")
    if not minimum <= value <= maximum:
        raise PolicyError(where, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _string_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise PolicyError(where, "must be a list")
    return [_string(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _patterns(value: object, where: str) -> tuple[str, ...]:
    patterns = _string_list(value, where)
    if not patterns:
        raise PolicyError(where, "must list at least one identity or pattern")
    for i, pattern in enumerate(patterns):
        if pattern.strip("*?") == "":
            raise PolicyError(f"{where}[{i}]", f"{pattern!r} would match every identity")
    return tuple(patterns)


def _builders(value: object, where: str) -> tuple[str, ...]:
    """Optional: absent means the authority refuses provenance; present must not be empty."""
    if value is None:
        return ()
    where = f"{where}.provenance_builders"
    patterns = _string_list(value, where)
    if not patterns:
        raise PolicyError(where, "must list at least one builder id or pattern (or be left out)")
    for i, pattern in enumerate(patterns):
        if pattern.strip("*?") == "":
            raise PolicyError(f"{where}[{i}]", f"{pattern!r} would match every builder")
    return tuple(patterns)


def _rotation(value: object, where: str) -> timedelta:
    if value in _ROTATION_WORDS:
        return timedelta(days=_ROTATION_WORDS[str(value)])
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{0,4}d", value):
        return timedelta(days=int(value[:-1]))
    raise PolicyError(where, f"must be annual, quarterly, monthly or <N>d, got {value!r}")


@functools.cache
def current_policy() -> Policy:
    """The service's policy, loaded once per process from ``settings.SIGNING_POLICY_FILE``."""
    from django.conf import settings

    return load_policy(Path(settings.SIGNING_POLICY_FILE))
