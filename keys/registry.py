"""Which backend object serves a key: wiring comes from settings, never from the policy file."""

from __future__ import annotations

import os
import threading
from typing import Any

from django.conf import settings

from keys.backends.base import BackendUnavailable, KeyBackend
from keys.models import KeyBackendName, SigningKey
from signing_service.policy import CHECKPOINT_AUTHORITY

_lock = threading.Lock()
_backends: dict[tuple[str, str], KeyBackend] = {}


def _env_suffix(authority: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in authority).upper()


def pkcs11_token_label(authority: str) -> str:
    if authority == CHECKPOINT_AUTHORITY:  # its own token, never a signing authority's
        return str(settings.AUDIT_CHECKPOINT_TOKEN)
    return os.environ.get(f"PKCS11_TOKEN_{_env_suffix(authority)}", f"modelsign-{authority}")


def pkcs11_pin(authority: str) -> str:
    from keys.backends.pkcs11 import read_pin_file

    if authority == CHECKPOINT_AUTHORITY:
        return read_pin_file(str(settings.AUDIT_CHECKPOINT_PIN_FILE))
    path = os.environ.get(f"PKCS11_PIN_FILE_{_env_suffix(authority)}") or settings.PKCS11_PIN_FILE
    return read_pin_file(str(path))


def pkcs11_backend(authority: str, token_label: str | None = None) -> KeyBackend:
    from keys.backends.pkcs11 import Pkcs11Backend

    label = token_label or pkcs11_token_label(authority)
    with _lock:
        backend = _backends.get(("pkcs11", label))
        if backend is None:
            backend = Pkcs11Backend(settings.PKCS11_MODULE, label, pkcs11_pin(authority))
            _backends[("pkcs11", label)] = backend
        return backend


def vault_key_name(authority: str) -> str:
    """The transit key an authority's ceremonies create or rotate: VAULT_KEY_<AUTHORITY>."""
    return os.environ.get(f"VAULT_KEY_{_env_suffix(authority)}", f"modelsign-{authority}")


def vault_key_variable(authority: str) -> str:
    """The name of the setting :func:`vault_key_name` reads, for messages."""
    return f"VAULT_KEY_{_env_suffix(authority)}"


def vault_backend(mount: str | None = None) -> KeyBackend:
    """The Vault transit backend that signs, verifies and reads public keys (the runtime
    credential); credentials are read from files, never the environment."""
    token_file = os.environ.get("VAULT_TOKEN_FILE")
    secret_file = os.environ.get("VAULT_SECRET_ID_FILE")
    return _vault("vault", mount, token_file, settings.VAULT_ROLE_ID, secret_file)


def vault_ceremony_backend(mount: str | None = None) -> KeyBackend:
    """The Vault backend key ceremonies create and rotate transit keys with.

    Its own credential when one is set (VAULT_CEREMONY_TOKEN_FILE, or VAULT_CEREMONY_ROLE_ID
    + VAULT_CEREMONY_SECRET_ID_FILE: deploy/vault/modelsign-ceremony-policy.hcl), else the
    runtime one (development, or a token allowed both).
    """
    token_file = os.environ.get("VAULT_CEREMONY_TOKEN_FILE")
    secret_file = os.environ.get("VAULT_CEREMONY_SECRET_ID_FILE")
    role_id = settings.VAULT_CEREMONY_ROLE_ID
    if token_file and (role_id or secret_file):
        raise BackendUnavailable(
            "set VAULT_CEREMONY_TOKEN_FILE or VAULT_CEREMONY_ROLE_ID with "
            "VAULT_CEREMONY_SECRET_ID_FILE for key ceremonies, not both"
        )
    if bool(role_id) != bool(secret_file) and not token_file:
        missing = "VAULT_CEREMONY_SECRET_ID_FILE" if role_id else "VAULT_CEREMONY_ROLE_ID"
        raise BackendUnavailable(
            f"the ceremonies' Vault AppRole is half configured: {missing} is not set"
        )
    if not (token_file or role_id):
        return vault_backend(mount)
    return _vault("vault-ceremony", mount, token_file, role_id, secret_file)


def _vault(
    kind: str, mount: str | None, token_file: str | None, role_id: str, secret_file: str | None
) -> KeyBackend:
    from keys.backends.vault import VaultTransitBackend, token_from_file

    if not settings.VAULT_ADDR:
        raise BackendUnavailable("VAULT_ADDR is not set: this deployment has no Vault")
    mount = mount or settings.VAULT_TRANSIT_MOUNT
    with _lock:
        backend = _backends.get((kind, mount))
        if backend is None:
            backend = VaultTransitBackend(
                settings.VAULT_ADDR,
                mount,
                token=token_from_file(token_file) if token_file else None,
                role_id=role_id or None,
                secret_id=token_from_file(secret_file) if secret_file else None,
                verify=settings.VAULT_CACERT or True,
            )
            _backends[(kind, mount)] = backend
        return backend


def backend_for(key: SigningKey) -> KeyBackend:
    if key.backend == KeyBackendName.PKCS11:
        return pkcs11_backend(key.authority, key.key_ref.get("token"))
    if key.backend == KeyBackendName.VAULT:
        return vault_backend(key.key_ref.get("mount"))
    raise BackendUnavailable(f"the {key.backend} key backend is not available in this deployment")


def backend_for_authority(authority: str, backend: str) -> KeyBackend:
    """The backend a key ceremony makes ``authority``'s new key on (for Vault: with the
    ceremonies' credential)."""
    if backend == KeyBackendName.PKCS11:
        return pkcs11_backend(authority)
    if backend == KeyBackendName.VAULT:
        return vault_ceremony_backend()
    raise BackendUnavailable(f"keys for the {backend} backend are not generated by this service")


def reset() -> None:
    """Forget backend objects (tests, and after settings change)."""
    global _sigstore
    with _lock:
        _backends.clear()
        _sigstore = None


_sigstore: Any = None


def sigstore_signer() -> Any:
    """The keyless signer (public-good Sigstore, or the instance SIGSTORE_TRUST_CONFIG names)."""
    global _sigstore
    from keys.backends.sigstore_keyless import SigstoreKeylessSigner

    with _lock:
        if _sigstore is None:
            _sigstore = SigstoreKeylessSigner(
                settings.SIGSTORE_TRUST_CONFIG or None, staging=settings.SIGSTORE_STAGING
            )
        return _sigstore
