"""A re-signed bundle verifies with the reference verifier (`model_signing verify key`)
against the new key, for the same model directory the original bundle was made for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from keys.models import ResignBatch
from signing_service.models import Signature
from tests.fixtures_service import authed, model_signing_verify, request_body, write_model
from tests.resigning_helpers import revoke_and_replace, rotate

pytestmark = [pytest.mark.softhsm, pytest.mark.interop, pytest.mark.django_db(transaction=True)]


def sign_model(api: Any, token: str, model: Path) -> Signature:
    response = authed(api, token).post(
        "/api/v1/signing-requests/", request_body(model), format="json"
    )
    assert response.status_code == 201 and response.json()["state"] == "signed", response.content
    return Signature.objects.get(request_id=response.json()["id"])


def public_key_file(api: Any, hint: str, path: Path) -> Path:
    response = api.get(f"/api/v1/keys/{hint}.pem")
    assert response.status_code == 200
    path.write_bytes(response.content)
    return path


@pytest.mark.parametrize("how", ["rotation", "revocation"])
def test_model_signing_accepts_the_re_signed_bundle_with_the_new_key(
    api: Any, issue_token: Any, active_keys: Any, tmp_path: Path, how: str
) -> None:
    model = write_model(
        tmp_path / "model", {"config.json": b"{}", "weights/layer-0.bin": b"\x01" * 4096}
    )
    original = sign_model(api, issue_token(), model)
    old = active_keys["staging"]
    if how == "rotation":
        new = rotate(old)
    else:
        _, new = revoke_and_replace(old, original.signed_at)
    assert ResignBatch.objects.get().state == "completed"
    resigned = Signature.objects.get(supersedes=original)
    assert resigned.key_id == new.pk
    bundle_file = tmp_path / "model.sig"
    bundle_file.write_text(resigned.bundle)
    new_pem = public_key_file(api, new.hint, tmp_path / "new.pem")
    old_pem = public_key_file(api, old.hint, tmp_path / "old.pem")
    result = model_signing_verify(model, bundle_file, new_pem)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout
    wrong = model_signing_verify(model, bundle_file, old_pem)
    assert wrong.returncode != 0  # signed by the new key, not the old one
    assert Signature.objects.get(pk=original.pk).state == "superseded"
    assert resigned.signed_at >= original.signed_at and resigned.signed_at <= timezone.now()
