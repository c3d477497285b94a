"""The deployment gate: `modelsign verify --trust --deployment`, one verdict per case."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from django.utils import timezone

from approvals.services import decide
from keys.lifecycle import transition
from keys.models import KeyState
from signing_service import bundle
from signing_service.client.cli import main
from signing_service.manifest import DEFAULT_IGNORE_PATHS
from tests.fixtures_service import authed, request_body, write_model
from tests.test_trust_verify import fetch, signed_at

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]

POLICY = """
certificate_policy:
  version: "gate-test"
  signing_authorities:
    production: {type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
                 authorized_signers: [ml-platform-ci@company.com], requires_approval: true, approval_count: APPROVALS}
    staging: {type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
              authorized_signers: [ml-platform-ci@company.com], requires_approval: false}
    development: {type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
                  authorized_signers: ["*@company.com"], requires_approval: false}
  verification_policy:
    anything_signed: {require_signature: true, accepted_authorities: [production, staging, development],
                      require_provenance: false, max_signature_age_days: 30}
    production_only: {require_signature: true, accepted_authorities: [production], require_provenance: false}
    with_provenance: {require_signature: true, accepted_authorities: [staging], require_provenance: true}
    unsigned_ok: {require_signature: false, accepted_authorities: [staging]}
"""


@pytest.fixture
def policy(settings: Any, tmp_path: Path) -> Any:
    def write(approvals: int = 2) -> None:
        path = tmp_path / f"policy-{approvals}.yaml"
        path.write_text(POLICY.replace("APPROVALS", str(approvals)))
        settings.SIGNING_POLICY_FILE = str(path)

    write()
    return write


@pytest.fixture
def world(
    policy: Any,
    live_server: Any,
    api: Any,
    issue_token: Any,
    active_keys: Any,
    make_user: Any,
    tmp_path: Path,
) -> Any:
    """A staging bundle, a production bundle with two approvals, and a trust file."""
    ci = authed(api, issue_token(authorities=("staging", "production")))
    out: dict[str, Any] = {"tmp": tmp_path, "keys": active_keys, "server": live_server.url}
    for authority in ("staging", "production"):
        model = write_model(
            tmp_path / authority, {"weights.bin": authority.encode() * 100, "cfg.json": b"{}"}
        )
        rid = ci.post(
            "/api/v1/signing-requests/", request_body(model, environment=authority), format="json"
        ).json()["id"]
        if authority == "production":
            for name in ("alice", "bob"):
                decide(rid, make_user(name), "approve", otp_verified_at=timezone.now())
        sig = tmp_path / f"{authority}.sig"
        sig.write_bytes(ci.get(f"/api/v1/signing-requests/{rid}/bundle").content)
        out[authority] = (model, sig)
    out["pin"] = tmp_path / "pin.pem"
    out["pin"].write_text(active_keys["development"].public_key_pem)
    refetch(out)
    return out


def refetch(world: dict[str, Any]) -> None:
    world["trust"] = world["tmp"] / "trust.json"
    assert fetch(world["server"], world["trust"], "--pin-key", str(world["pin"])) == 0


def gate(
    world: dict[str, Any], which: str, deployment: str, *extra: str, capsys: Any
) -> tuple[int, dict[str, Any]]:
    model, sig = world[which]
    capsys.readouterr()
    argv = ["verify", str(model), "--signature", str(sig), "--trust", str(world["trust"]),
            "--deployment", deployment, "--json", "--quiet", *extra]  # fmt: skip
    rc = main(argv)
    return rc, json.loads(capsys.readouterr().out)


def failed(result: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in result["checks"] if not c["ok"]}


def test_all_good_accepts(world: Any, capsys: Any) -> None:
    rc, result = gate(world, "staging", "anything_signed", capsys=capsys)
    assert (rc, result["verdict"], failed(result)) == (0, "accept", {})
    rc, result = gate(world, "production", "production_only", capsys=capsys)
    assert (rc, failed(result)) == (0, {})
    assert any("2 distinct approvers" in c["detail"] for c in result["checks"])


def test_unsigned(world: Any, capsys: Any) -> None:
    model, _ = world["staging"]
    world["unsigned"] = (model, world["tmp"] / "missing.sig")
    rc, result = gate(world, "unsigned", "anything_signed", capsys=capsys)
    assert rc == 3 and "signature present" in failed(result)
    assert gate(world, "unsigned", "unsigned_ok", capsys=capsys)[0] == 0
    assert gate(world, "unsigned", "anything_signed", "--mode", "permissive", capsys=capsys)[0] == 0


def test_wrong_key(world: Any, capsys: Any) -> None:
    model, _ = world["staging"]
    other = ec.generate_private_key(ec.SECP256R1())
    payload = bundle.statement_payload(
        bundle.build_statement(model.name, [], ignore_paths=DEFAULT_IGNORE_PATHS)
    )
    der = other.sign(bundle.pae(payload), ec.ECDSA(hashes.SHA256()))
    forged = world["tmp"] / "forged.sig"
    forged.write_bytes(
        bundle.bundle_bytes(
            bundle.build_bundle(payload, der, hint=bundle.key_hint(other.public_key()))
        )
    )
    world["forged"] = (model, forged)
    rc, result = gate(world, "forged", "anything_signed", capsys=capsys)
    assert rc == 3 and "does not list" in failed(result)["bundle signature"]


@pytest.mark.parametrize(
    ("moves", "offset", "verdict", "reason"),
    [
        ((KeyState.TRANSITION,), None, 0, None),
        ((KeyState.TRANSITION, KeyState.RETIRED), None, 3, "retired"),
        ((KeyState.REVOKED,), timedelta(seconds=1), 0, None),  # revoked after it signed
        ((KeyState.REVOKED,), timedelta(0), 3, "revoked"),  # revoked from the signing time
    ],
    ids=["transition", "retired", "revoked-after", "revoked-at"],
)
def test_key_states(
    world: Any, capsys: Any, moves: tuple[str, ...], offset: Any, verdict: int, reason: str | None
) -> None:
    key = world["keys"]["staging"]
    for state in moves:
        effective = signed_at(world["staging"][1]) + offset if state == KeyState.REVOKED else None
        transition(key.pk, state, actor="t", reason="compromised", effective_at=effective)
    refetch(world)
    rc, result = gate(world, "staging", "anything_signed", capsys=capsys)
    assert rc == verdict, result
    if reason:
        assert reason in failed(result)["key state"]


def test_too_old(world: Any, capsys: Any) -> None:
    later = (signed_at(world["staging"][1]) + timedelta(days=31)).isoformat()
    rc, result = gate(world, "staging", "anything_signed", "--at", later, capsys=capsys)
    assert rc == 3 and "the limit is 30 days" in failed(result)["signature age"]


def test_authority_not_accepted(world: Any, capsys: Any) -> None:
    rc, result = gate(world, "staging", "production_only", capsys=capsys)
    assert rc == 3 and "'staging' is not accepted" in failed(result)["authority"]


def test_missing_provenance(world: Any, capsys: Any) -> None:
    rc, result = gate(world, "staging", "with_provenance", capsys=capsys)
    assert rc == 3 and "carries no provenance" in failed(result)["provenance"]


def test_too_few_approvers(world: Any, policy: Any, capsys: Any) -> None:
    policy(approvals=3)  # the policy now wants three; the bundle lists two
    refetch(world)
    rc, result = gate(world, "production", "production_only", capsys=capsys)
    assert rc == 3 and "2 distinct approvers; production needs 3" in failed(result)["approvals"]


@pytest.mark.parametrize("tamper", ["changed-file", "extra-file"])
def test_tampered_models(world: Any, capsys: Any, tamper: str) -> None:
    model, _ = world["staging"]
    if tamper == "changed-file":
        (model / "cfg.json").write_bytes(b'{"x": 1}')
    else:
        (model / "extra.bin").write_bytes(b"x")
    rc, result = gate(world, "staging", "anything_signed", capsys=capsys)
    assert rc == 3 and "model files" in failed(result)


def test_warn_mode_reports_and_accepts(world: Any, capsys: Any) -> None:
    rc, result = gate(world, "staging", "production_only", "--mode", "warn", capsys=capsys)
    assert rc == 0 and result["verdict"] == "accept" and "authority" in failed(result)


def test_human_output_has_a_line_per_check(world: Any, capsys: Any) -> None:
    model, sig = world["staging"]
    capsys.readouterr()
    args = ["verify", str(model), "--signature", str(sig), "--trust", str(world["trust"]), "--deployment", "production_only", "--quiet"]  # fmt: skip
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "PASS  bundle signature" in out and "FAIL  authority" in out
    assert out.strip().splitlines()[-1].startswith("REJECT for production_only")
