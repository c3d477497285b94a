"""The one small interface every key backend implements (SPEC section 9).

A backend never returns private key material. ``key_ref`` is the backend's own JSON
reference to a key (token and label for PKCS#11, key name and version for Vault); it is
stored on the ``SigningKey`` row and handed back on every call.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

KeyRef = dict[str, Any]


class KeyBackendError(Exception):
    """Base error of every backend. The message is safe to show to an operator."""


class BackendUnavailable(KeyBackendError):
    """The backend cannot be reached or used right now (module, token, PIN, network).

    Callers must wait or fail the request; they must never fall back to another key.
    """


class KeyNotUsable(KeyBackendError):
    """The key does not exist or does not meet the service's requirements."""


@dataclass(frozen=True)
class GeneratedKey:
    key_ref: KeyRef
    public_key: ec.EllipticCurvePublicKey
    #: What was checked on the new key (e.g. PKCS#11 attributes), for the audit transcript.
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


class KeyBackend(abc.ABC):
    """Generate keys, expose their public halves, and sign DSSE PAE bytes."""

    name: str

    @abc.abstractmethod
    def generate(self, label: str, algorithm: str = "ECDSA-P256") -> GeneratedKey:
        """Create a new non-exportable key inside the backend."""

    @abc.abstractmethod
    def public_key(self, key_ref: KeyRef) -> ec.EllipticCurvePublicKey:
        """The key's public half, read from the backend."""

    @abc.abstractmethod
    def check_usable(self, key_ref: KeyRef) -> dict[str, Any]:
        """Raise :class:`KeyNotUsable` unless the key may be used; return what was checked."""

    @abc.abstractmethod
    def sign(self, key_ref: KeyRef, pae_bytes: bytes) -> bytes:
        """Sign the DSSE PAE bytes; return a DER-encoded ECDSA signature."""

    @abc.abstractmethod
    def health(self) -> Health:
        """Whether the backend can sign right now."""

    def destroy(self, key_ref: KeyRef) -> dict[str, Any]:
        """Destroy the private key in the backend, irreversibly; return what was destroyed.

        Only a completed destroy ceremony calls this, for a retired or revoked key.
        """
        raise KeyBackendError(f"the {self.name} backend cannot destroy keys")
