"""Bundles the service signs on the HSM verify with the reference `model_signing` CLI."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from signing_service.bundle import BUNDLE_MEDIA_TYPE, SERVICE_PREDICATE_KEY, parse_bundle
from tests.fixtures_service import authed, model_signing_verify, request_body, write_model

pytestmark = [pytest.mark.softhsm, pytest.mark.interop]

MODELS: dict[str, dict[str, bytes]] = {
    "nested": {
        "config.json": b"{}",
        "weights/layer-0.bin": b"\x00" * 4096,
        "weights/deep/x.bin": b"x",
    },
    "unicode-and-spaces": {"tökenizer vocab.json": b'{"a": 1}', "Modèle/poids 1.bin": b"p"},
    "empty-file": {"empty.bin": b"", "model.bin": b"m"},
    "sub-ordering": {"sub/a": b"1", "sub-x": b"2", "sub.y": b"3", "sub/b/c": b"4"},
    "with-git": {"model.bin": b"m", ".gitignore": b"*.tmp", ".git/HEAD": b"ref"},
}


def sign_via_api(api: Any, token: str, model: Path) -> tuple[dict[str, Any], bytes]:
    response = authed(api, token).post(
        "/api/v1/signing-requests/", request_body(model), format="json"
    )
    assert response.status_code == 201, response.content
    req = response.json()
    assert req["state"] == "signed", req
    bundle = authed(api, token).get(f"/api/v1/signing-requests/{req['id']}/bundle")
    assert bundle.status_code == 200
    assert bundle["Content-Type"] == BUNDLE_MEDIA_TYPE
    return req, bundle.content


def save_public_key(api: Any, hint: str, path: Path) -> Path:
    response = api.get(f"/api/v1/keys/{hint}.pem")
    assert response.status_code == 200
    path.write_bytes(response.content)
    return path


@pytest.fixture
def signed(api: Any, issue_token: Any, active_keys: Any, tmp_path: Path) -> Any:
    token = issue_token()

    def sign(
        files: dict[str, bytes], name: str = "model", single: bool = False
    ) -> tuple[Path, Path, Path]:
        model = write_model(tmp_path / name, files)
        if single:
            (model,) = model.iterdir()
        req, bundle = sign_via_api(api, token, model)
        sig = tmp_path / f"{name}.sig"
        sig.write_bytes(bundle)
        pem = save_public_key(api, req["key"]["hint"], tmp_path / f"{name}.pem")
        return model, sig, pem

    return sign


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("case", sorted(MODELS))
def test_model_signing_accepts_service_bundles(signed: Any, case: str) -> None:
    model, sig, pem = signed(MODELS[case], name=case)
    result = model_signing_verify(model, sig, pem)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout


@pytest.mark.django_db(transaction=True)
def test_single_file_model(signed: Any) -> None:
    model, sig, pem = signed({"model.safetensors": b"tensor bytes"}, name="single", single=True)
    assert model.is_file()
    statement = json.loads(
        base64.b64decode(parse_bundle(sig.read_bytes())["dsseEnvelope"]["payload"])
    )
    assert [r["name"] for r in statement["predicate"]["resources"]] == ["."]
    result = model_signing_verify(model, sig, pem)
    assert result.returncode == 0, result.stdout + result.stderr
    model.write_bytes(b"tensor bytez")
    assert model_signing_verify(model, sig, pem).returncode != 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("tamper", ["changed-byte", "extra-file", "missing-file"])
def test_model_signing_rejects_tampered_models(signed: Any, tamper: str) -> None:
    model, sig, pem = signed({"a.bin": b"aaaa", "dir/b.bin": b"bbbb"}, name=tamper)
    if tamper == "changed-byte":
        (model / "a.bin").write_bytes(b"aaab")
    elif tamper == "extra-file":
        (model / "dir" / "c.bin").write_bytes(b"c")
    else:
        (model / "dir" / "b.bin").unlink()
    result = model_signing_verify(model, sig, pem)
    assert result.returncode != 0
    assert "Verification failed" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_bundle_carries_our_metadata_and_the_key_hint(signed: Any) -> None:
    _model, sig, pem = signed({"m.bin": b"m"}, name="meta")
    bundle = parse_bundle(sig.read_bytes())
    assert (
        bundle["verificationMaterial"]["publicKey"]["hint"]
        == hashlib.sha256(pem.read_bytes()).hexdigest()
    )
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    meta = statement["predicate"][SERVICE_PREDICATE_KEY]
    assert meta["authority"] == "staging"
    assert meta["model_version"] == "1.0.0"
    assert meta["requester"] == "ml-platform-ci@company.com"
    assert set(meta) >= {"request_id", "statement_digest", "signed_at", "key_hint", "approvals"}
