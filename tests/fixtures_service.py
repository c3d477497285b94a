"""Fixtures for the service: HSM-backed active keys, CI tokens, an API client, models on disk."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from keys import registry
from keys.lifecycle import register_key
from keys.models import SigningKey
from signing_service import signing
from signing_service.manifest import DEFAULT_IGNORE_PATHS
from signing_service.models import ApiToken

AUTHORITIES = ("production", "staging", "development")
CI_IDENTITY = "ml-platform-ci@company.com"


@pytest.fixture
def hsm(softhsm_token: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point every authority of the local policy at the session's SoftHSM test token."""
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(softhsm_token.user_pin + "\n")
    pin_file.chmod(0o600)
    settings.PKCS11_MODULE = softhsm_token.module_path
    settings.PKCS11_PIN_FILE = pin_file
    for name in AUTHORITIES:
        monkeypatch.setenv(f"PKCS11_TOKEN_{name.upper()}", softhsm_token.token_label)
    registry.reset()
    signing._usable_checked.clear()
    yield softhsm_token
    registry.reset()
    signing._usable_checked.clear()


@pytest.fixture
def active_keys(hsm: Any, db: None) -> dict[str, SigningKey]:
    """One freshly generated, active P-256 key on the HSM for each authority."""
    keys = {}
    for name in AUTHORITIES:
        backend = registry.pkcs11_backend(name)
        generated = backend.generate(f"{name}-{secrets.token_hex(4)}", "ECDSA-P256")
        keys[name] = register_key(
            name,
            backend,
            generated,
            algorithm="ECDSA-P256",
            validity=timedelta(days=365),
            actor="tests",
            activate=True,
        )
    return keys


@pytest.fixture
def issue_token(db: None) -> Callable[..., str]:
    def issue(
        identity: str = CI_IDENTITY,
        authorities: tuple[str, ...] = ("staging",),
        expires_in: timedelta | None = timedelta(days=1),
    ) -> str:
        expires = timezone.now() + expires_in if expires_in is not None else None
        return ApiToken.issue(identity, list(authorities), expires)[1]

    return issue


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def authed(api: APIClient, token: str) -> APIClient:
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return api


def write_model(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def reference_resources(model: Path) -> list[dict[str, str]]:
    """The resource list as the reference tool (model_signing) computes it."""
    from model_signing import hashing

    manifest = hashing.Config().hash(model)
    return [
        {"name": rd.identifier, "algorithm": "sha256", "digest": rd.digest.digest_hex}
        for rd in manifest.resource_descriptors()
    ]


def request_body(
    model_path: Path | None = None, *, environment: str = "staging", **overrides: Any
) -> dict[str, Any]:
    resources = (
        reference_resources(model_path)
        if model_path is not None
        else [
            {
                "name": "weights.bin",
                "algorithm": "sha256",
                "digest": hashlib.sha256(b"w").hexdigest(),
            }
        ]
    )
    body: dict[str, Any] = {
        "model": model_path.name if model_path is not None else "demo-model",
        "version": "1.0.0",
        "environment": environment,
        "resources": resources,
        "ignore_paths": list(DEFAULT_IGNORE_PATHS),
    }
    body.update(overrides)
    return body


def model_signing_verify(
    model: Path, signature: Path, public_key: Path
) -> subprocess.CompletedProcess[str]:
    """Run the reference verifier CLI exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(model),
         "--signature", str(signature), "--public_key", str(public_key)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


@pytest.fixture
def model_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "my-model"
    root.mkdir()
    yield root


# --- approvals -----------------------------------------------------------------------


@pytest.fixture
def make_user(db: None) -> Callable[..., Any]:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from approvals.groups import approver_group

    def make(
        username: str,
        *,
        approves: tuple[str, ...] = ("production",),
        password: str = "pw-" + "x" * 12,
    ) -> Any:
        user = get_user_model().objects.create_user(username, f"{username}@company.com", password)
        for authority in approves:
            user.groups.add(Group.objects.get_or_create(name=approver_group(authority))[0])
        return user

    return make


def totp_device(user: Any) -> Any:
    from django_otp.plugins.otp_totp.models import TOTPDevice

    return TOTPDevice.objects.create(user=user, name="test", confirmed=True)


def totp_code(device: Any) -> str:
    from django_otp.oath import TOTP

    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():0{device.digits}d}"


@pytest.fixture
def pending_request(
    api: APIClient, issue_token: Callable[..., str], active_keys: Any
) -> Callable[..., Any]:
    """Submit a production request as the CI identity; it waits for two approvals."""

    def submit(**overrides: Any) -> Any:
        token = issue_token(authorities=("production",))
        response = authed(api, token).post(
            "/api/v1/signing-requests/",
            request_body(environment="production", **overrides),
            format="json",
        )
        assert response.status_code == 201, response.content
        from signing_service.models import SigningRequest

        req = SigningRequest.objects.get(pk=response.json()["id"])
        assert req.state == "pending_approval"
        return req

    return submit
