"""Which backend object serves a key: wiring comes from settings, never from the policy file."""

from __future__ import annotations

import os
import threading

from django.conf import settings

from keys.backends.base import BackendUnavailable, KeyBackend
from keys.models import KeyBackendName, SigningKey

_lock = threading.Lock()
_backends: dict[tuple[str, str], KeyBackend] = {}


def _env_suffix(authority: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in authority).upper()


def pkcs11_token_label(authority: str) -> str:
    return os.environ.get(f"PKCS11_TOKEN_{_env_suffix(authority)}", f"modelsign-{authority}")


def pkcs11_pin(authority: str) -> str:
    from keys.backends.pkcs11 import read_pin_file

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


def backend_for(key: SigningKey) -> KeyBackend:
    if key.backend == KeyBackendName.PKCS11:
        return pkcs11_backend(key.authority, key.key_ref.get("token"))
    raise BackendUnavailable(f"the {key.backend} key backend is not available in this deployment")


def reset() -> None:
    """Forget backend objects (tests, and after settings change)."""
    with _lock:
        _backends.clear()
