"""Keyless (Sigstore) authorities through the API, offline.

What runs for real: policy and identity checks, the trust config of a private instance,
and the network path to a Fulcio that is not there (a closed loopback port). What cannot
run here is a live Fulcio/Rekor (see docs/sigstore-keyless.md); for the stored-signature
path, the test replaces only SigstoreKeylessSigner.sign_statement and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from keys import registry
from keys.backends.sigstore_keyless import SigstoreKeylessSigner
from signing_service.models import Signature, SigningRequest
from tests.fixtures_service import authed, request_body
from tests.test_sigstore_backend import email_token, trust_config_json

ROOT = Path(__file__).resolve().parent.parent
URL = "/api/v1/signing-requests/"
pytestmark = pytest.mark.django_db


@pytest.fixture
def keyless(settings: Any, tmp_path: Path) -> Any:
    """The spec's policy (development is keyless), a private instance on a closed port."""
    config = tmp_path / "trust.json"
    config.write_text(trust_config_json("http://127.0.0.1:9", "http://127.0.0.1:9"))
    settings.SIGNING_POLICY_FILE = str(ROOT / "deploy" / "policy.example.yaml")
    settings.SIGSTORE_TRUST_CONFIG = str(config)
    registry.reset()
    yield
    registry.reset()


def post(api: Any, token: str, identity_token: str | None) -> Any:
    extra = {"HTTP_SIGSTORE_IDENTITY_TOKEN": identity_token} if identity_token else {}
    return authed(api, token).post(
        URL, request_body(environment="development"), format="json", **extra
    )


def test_a_keyless_request_needs_an_identity_token(
    api: Any, issue_token: Any, keyless: None
) -> None:
    response = post(api, issue_token(authorities=("development",)), None)
    assert response.status_code == 400
    assert "Sigstore-Identity-Token" in response.json()["error"]["message"]
    assert not SigningRequest.objects.exists()


def test_an_identity_outside_allowed_identities_is_refused_before_fulcio(
    api: Any, issue_token: Any, keyless: None
) -> None:
    response = post(
        api, issue_token(authorities=("development",)), email_token(email="eve@evil.example")
    )
    assert response.status_code == 403
    assert "'eve@evil.example' is not in allowed_identities" in response.json()["error"]["message"]
    assert not SigningRequest.objects.exists()


def test_an_unreachable_fulcio_fails_the_request_with_its_name(
    api: Any, issue_token: Any, keyless: None
) -> None:
    response = post(
        api, issue_token(authorities=("development",)), email_token(email="dev@company.com")
    )
    body = response.json()
    assert body["state"] == "failed"
    assert "Fulcio at http://127.0.0.1:9" in body["failure_reason"]
    assert not Signature.objects.exists()


def test_a_keyless_signature_is_stored_with_its_certificate_identity(
    api: Any, issue_token: Any, keyless: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_sign(
        self: Any, statement: Any, token: str, *, allowed_identities: Any = None
    ) -> dict[str, Any]:
        seen.update(statement=statement, allowed=list(allowed_identities))
        return {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "stand-in": True}

    monkeypatch.setattr(SigstoreKeylessSigner, "sign_statement", fake_sign)
    token = issue_token(authorities=("development",))
    body = post(api, token, email_token(email="dev@company.com")).json()
    assert body["state"] == "signed"
    assert body["key"] == {"keyless": True, "signer_identity": "dev@company.com"}
    assert seen["allowed"] == ["*@company.com"]
    assert seen["statement"]["predicate"]["https://modelsign.dev/service/v1"]["key_hint"] is None
    served = authed(api, token).get(f"{URL}{body['id']}/bundle")
    assert json.loads(served.content)["stand-in"] is True
    assert Signature.objects.get().signer_identity == "dev@company.com"


@pytest.mark.django_db(transaction=True)
def test_the_client_sends_the_identity_token(
    live_server: Any,
    issue_token: Any,
    keyless: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    from signing_service.client.cli import main
    from tests.fixtures_service import write_model

    model = write_model(tmp_path / "m", {"w.bin": b"w"})
    monkeypatch.setenv("SIGSTORE_ID_TOKEN", email_token(email="dev@company.com"))
    args = ["sign", str(model), "--server", live_server.url, "--environment", "development",
            "--token", issue_token(authorities=("development",)), "--out", str(tmp_path / "m.sig"), "--quiet"]  # fmt: skip
    assert main(args) == 1
    # Reaching Fulcio proves the token arrived and passed the identity check.
    assert "Fulcio at http://127.0.0.1:9" in capsys.readouterr().err
    monkeypatch.delenv("SIGSTORE_ID_TOKEN")
    assert main(args) == 1
    assert "Sigstore-Identity-Token" in capsys.readouterr().err
