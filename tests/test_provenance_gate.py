"""The deployment gate with provenance: the verify matrix's provenance cases, through the real
gate (`modelsign verify --trust --deployment`, POST /api/v1/verify/), with real signatures
made by the service on SoftHSM."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from keys.registry import backend_for
from signing_service import bundle
from signing_service.client.cli import main
from tests.fixtures_service import authed, reference_resources, request_body, write_model
from tests.provenance_helpers import bundle_payload, root_of, statement
from tests.test_trust_verify import fetch

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]

SIGNER = "ml-platform-ci@company.com"
POLICY = f"""
certificate_policy:
  version: "provenance-gate-test"
  signing_authorities:
    staging: {{type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
              authorized_signers: [{SIGNER}], requires_approval: false,
              provenance_builders: ["https://github.com/slsa-framework/*"]}}
    development: {{type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
                  authorized_signers: [{SIGNER}], requires_approval: false,
                  provenance_builders: ["https://github.com/slsa-framework/*"]}}
    production: {{type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
                 authorized_signers: [{SIGNER}], requires_approval: false}}
  verification_policy:
    with_provenance: {{require_signature: true, accepted_authorities: [staging], require_provenance: true}}
    without_provenance: {{require_signature: true, accepted_authorities: [staging], require_provenance: false}}
"""


@pytest.fixture
def world(
    settings: Any, live_server: Any, api: Any, issue_token: Any, active_keys: Any, tmp_path: Path
) -> dict[str, Any]:
    """Models a and b signed by staging with their provenance, c signed without; a trust file."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings.SIGNING_POLICY_FILE = str(policy)
    ci = authed(api, issue_token(authorities=("staging", "development")))
    out: dict[str, Any] = {"tmp": tmp_path, "keys": active_keys, "ci": ci}
    for name in ("a", "b", "c"):
        model = write_model(tmp_path / name, {"weights.bin": name.encode() * 64, "cfg.json": b"{}"})
        body = request_body(model, environment="staging")
        if name != "c":
            body["provenance"] = statement(root_of(body["resources"]), name=name)
        req = ci.post("/api/v1/signing-requests/", body, format="json").json()
        assert req["state"] == "signed", req
        sig = tmp_path / f"{name}.sig"
        sig.write_bytes(ci.get(req["links"]["bundle"]).content)
        prov = None
        if req["links"]["provenance"]:
            prov = tmp_path / f"{name}.sig.provenance"
            prov.write_bytes(ci.get(req["links"]["provenance"]).content)
        out[name] = (model, sig, prov)
    pin = tmp_path / "pin.pem"
    pin.write_text(active_keys["staging"].public_key_pem)
    out["trust"] = tmp_path / "trust.json"
    assert fetch(live_server.url, out["trust"], "--pin-key", str(pin)) == 0
    return out


def gate(
    world: dict[str, Any], model: Path, sig: Path, deployment: str, *extra: str, capsys: Any
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    argv = ["verify", str(model), "--signature", str(sig), "--trust", str(world["trust"]),
            "--deployment", deployment, "--json", "--quiet", *extra]  # fmt: skip
    rc = main(argv)
    return rc, json.loads(capsys.readouterr().out)


def failed(result: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in result["checks"] if not c["ok"]}


def passed(result: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in result["checks"] if c["ok"]}


def sign_with(key: Any, payload: bytes) -> bytes:
    """A bundle over ``payload`` made by ``key`` on the HSM, as the service would make it."""
    der = backend_for(key).sign(key.key_ref, bundle.pae(payload))
    return bundle.bundle_bytes(bundle.build_bundle(payload, der, hint=key.hint))


def test_provenance_and_its_bundle_accept(world: Any, capsys: Any) -> None:
    model, sig, prov = world["a"]
    rc, result = gate(world, model, sig, "with_provenance", capsys=capsys)
    assert (rc, failed(result)) == (0, {})
    assert "provenance bundle" not in passed(result)  # not given: the signed predicate is checked
    rc, result = gate(
        world, model, sig, "with_provenance", "--provenance-signature", str(prov), capsys=capsys
    )
    assert (rc, result["verdict"], failed(result)) == (0, "accept", {})
    assert "builder https://github.com/slsa-framework/" in passed(result)["provenance bundle"]


def test_missing_provenance_when_required_rejects(world: Any, capsys: Any) -> None:
    model, sig, _ = world["c"]
    rc, result = gate(world, model, sig, "with_provenance", capsys=capsys)
    assert rc == 3 and result["verdict"] == "reject"
    assert "carries no provenance" in failed(result)["provenance"]
    # Somebody else's provenance bundle does not make up for it.
    rc, result = gate(
        world, model, sig, "with_provenance", "--provenance-signature", str(world["a"][2]),
        capsys=capsys,
    )  # fmt: skip
    assert rc == 3 and set(failed(result)) == {"provenance", "provenance bundle"}
    # Not required: the same model passes.
    assert gate(world, model, sig, "without_provenance", capsys=capsys)[0] == 0


def test_provenance_for_other_content_rejects(world: Any, capsys: Any) -> None:
    model, sig, _ = world["a"]
    other = world["b"][2]  # b's provenance, signed by the same key: its subject is b
    rc, result = gate(
        world, model, sig, "with_provenance", "--provenance-signature", str(other), capsys=capsys
    )
    assert rc == 3 and result["verdict"] == "reject"
    assert "the provenance is for other content" in failed(result)["provenance bundle"]
    # Even where provenance is not required, a provenance bundle that was given must hold.
    rc, result = gate(
        world, model, sig, "without_provenance", "--provenance-signature", str(other),
        capsys=capsys,
    )  # fmt: skip
    assert rc == 3 and "for other content" in failed(result)["provenance bundle"]


def test_a_signed_predicate_with_another_subject_digest_rejects(world: Any, capsys: Any) -> None:
    """The model's own signed statement says its provenance is for other content."""
    model, sig, _ = world["a"]
    signed = json.loads(bundle_payload(sig.read_bytes()))
    meta = signed["predicate"][bundle.SERVICE_PREDICATE_KEY]
    meta["provenance"]["subject_digest"] = root_of(reference_resources(world["b"][0]))
    forged = world["tmp"] / "forged.sig"
    forged.write_bytes(sign_with(world["keys"]["staging"], bundle.statement_payload(signed)))
    rc, result = gate(world, model, forged, "with_provenance", capsys=capsys)
    assert rc == 3
    assert failed(result) == {
        "provenance": "the provenance is for other content (subject digest differs)"
    }


def test_a_provenance_bundle_must_be_the_one_the_model_names(world: Any, capsys: Any) -> None:
    model, sig, prov = world["a"]
    root = root_of(reference_resources(model))
    # Same subject, other statement, signed by the right key: not what was approved/signed.
    other = bundle.statement_payload(statement(root, name="a", invocation="run 99"))
    swapped = world["tmp"] / "swapped.provenance"
    swapped.write_bytes(sign_with(world["keys"]["staging"], other))
    rc, result = gate(
        world, model, sig, "with_provenance", "--provenance-signature", str(swapped), capsys=capsys
    )
    assert rc == 3
    assert "not the provenance the model's signature names" in failed(result)["provenance bundle"]
    # The right statement, but signed by another authority's key.
    foreign = world["tmp"] / "foreign.provenance"
    foreign.write_bytes(sign_with(world["keys"]["development"], bundle_payload(prov.read_bytes())))
    rc, result = gate(
        world, model, sig, "with_provenance", "--provenance-signature", str(foreign), capsys=capsys
    )
    assert rc == 3
    assert "of 'development'; the model by 'staging'" in failed(result)["provenance bundle"]


def test_a_tampered_provenance_bundle_rejects(world: Any, capsys: Any) -> None:
    model, sig, prov = world["a"]
    data = json.loads(prov.read_bytes())
    payload = json.loads(bundle_payload(prov.read_bytes()))
    payload["predicate"]["runDetails"]["builder"]["id"] = "https://evil.example/builder"
    data["dsseEnvelope"]["payload"] = base64.b64encode(bundle.statement_payload(payload)).decode()
    tampered = world["tmp"] / "tampered.provenance"
    tampered.write_text(json.dumps(data))
    rc, result = gate(
        world, model, sig, "with_provenance", "--provenance-signature", str(tampered), capsys=capsys
    )
    assert rc == 3 and "does not verify" in failed(result)["provenance bundle"]


def test_the_verify_api_checks_the_provenance_bundle(world: Any) -> None:
    model, sig, prov = world["a"]
    body = {
        "deployment": "with_provenance",
        "bundle": json.loads(sig.read_bytes()),
        "resources": reference_resources(model),
        "provenance_bundle": json.loads(prov.read_bytes()),
    }
    result = APIClient().post("/api/v1/verify/", body, format="json").json()
    assert result["verdict"] == "accept", result
    assert "provenance bundle" in passed(result)
    body["provenance_bundle"] = json.loads(world["b"][2].read_bytes())
    result = APIClient().post("/api/v1/verify/", body, format="json").json()
    assert result["verdict"] == "reject"
    assert "for other content" in failed(result)["provenance bundle"]
    unsigned = world["c"]
    body = {"deployment": "with_provenance", "bundle": json.loads(unsigned[1].read_bytes())}
    result = APIClient().post("/api/v1/verify/", body, format="json").json()
    assert result["verdict"] == "reject" and "carries no provenance" in failed(result)["provenance"]
