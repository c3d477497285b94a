"""OCI image manifests: signed without pulling a layer; the bundle verifies the model dir."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from signing_service.client.cli import main
from signing_service.models import SigningRequest
from tests.fixtures_service import authed, model_signing_verify, write_model

pytestmark = [pytest.mark.softhsm, pytest.mark.interop]
URL = "/api/v1/oci-signing-requests/"
FILES = {
    "model.safetensors": b"\x00weights" * 512,
    "config.json": b"{}",
    "tokenizer/vocab.json": b'{"a": 0}',
}


def manifest_for(model: Path) -> dict[str, Any]:
    """What `oras push` makes of a model directory: one raw layer per file."""
    layers = []
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        data = path.read_bytes()
        layers.append({
            "mediaType": "application/vnd.cncf.model.weight.v1.raw",
            "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "annotations": {"org.opencontainers.image.title": path.relative_to(model).as_posix()},
        })  # fmt: skip
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.cncf.model.config.v1+json",
            "digest": "sha256:" + "0" * 64,
            "size": 2,
        },
        "layers": layers,
        "annotations": {"org.opencontainers.image.title": "resnet"},
    }


@pytest.mark.django_db
def test_a_manifest_is_signed_and_the_bundle_verifies_the_model_directory(
    api: Any, issue_token: Any, active_keys: Any, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "resnet", FILES)
    client = authed(api, issue_token())
    response = client.post(
        URL,
        {"manifest": manifest_for(model), "version": "v1", "environment": "staging"},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "signed" and body["model"] == "resnet" and body["resource_count"] == 3
    sig = tmp_path / "resnet.sig"
    sig.write_bytes(client.get(f"/api/v1/signing-requests/{body['id']}/bundle").content)
    pem = tmp_path / "staging.pem"
    pem.write_text(active_keys["staging"].public_key_pem)
    result = model_signing_verify(model, sig, pem)
    assert result.returncode == 0, result.stderr


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["layers"][1]["annotations"].update(
                {"org.opencontainers.image.title": "config.json"}
            ),
            "after Unicode normalisation",
        ),
        (
            lambda m: m["layers"][0].pop("annotations"),
            "has no org.opencontainers.image.title annotation",
        ),
        (
            lambda m: m["layers"][0].update({"digest": "sha512:" + "0" * 128}),
            "is not a sha256:<64 hex> digest",
        ),
        (
            lambda m: m["layers"][0]["annotations"].update(
                {"org.opencontainers.image.title": "../etc/x"}
            ),
            "'..' path segment",
        ),
        (
            lambda m: m.update({"mediaType": "application/vnd.oci.image.index.v1+json"}),
            "is not an image manifest",
        ),
        (lambda m: m.update({"layers": []}), "has no layers"),
    ],
    ids=["duplicate-title", "missing-title", "not-sha256", "dot-dot", "index", "no-layers"],
)
def test_bad_manifests_are_refused_and_nothing_is_stored(
    api: Any, issue_token: Any, tmp_path: Path, change: Any, message: str
) -> None:
    manifest = manifest_for(write_model(tmp_path / "m", FILES))
    change(manifest)
    response = authed(api, issue_token()).post(
        URL, {"manifest": manifest, "version": "v1", "environment": "staging"}, format="json"
    )
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert not SigningRequest.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_sign_oci_and_verify_oci_from_the_client(
    live_server: Any, issue_token: Any, active_keys: Any, tmp_path: Path, capsys: Any
) -> None:
    model = write_model(tmp_path / "resnet", FILES)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(manifest_for(model)))
    sig, pem = tmp_path / "oci.sig", tmp_path / "k.pem"
    pem.write_text(active_keys["staging"].public_key_pem)
    argv = ["sign-oci", str(manifest), "--server", live_server.url, "--environment", "staging",
            "--token", issue_token(), "--out", str(sig), "--model-version", "v2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (
        main(["verify-oci", str(manifest), "--signature", str(sig), "--public-key", str(pem)]) == 0
    )
    assert model_signing_verify(model, sig, pem).returncode == 0
    changed = copy.deepcopy(manifest_for(model))
    changed["layers"][0]["digest"] = "sha256:" + "1" * 64
    manifest.write_text(json.dumps(changed))
    capsys.readouterr()
    assert (
        main(["verify-oci", str(manifest), "--signature", str(sig), "--public-key", str(pem)]) == 1
    )
    assert "layer changed: config.json" in capsys.readouterr().err
