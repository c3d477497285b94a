"""Signing a model with its provenance, end to end on SoftHSM: `modelsign sign --provenance`
writes both bundles, both verify (the model bundle also with `model_signing verify key`); the
two signatures are stored together or not at all; an approval does not survive a change of
the provenance it was given for."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from approvals.models import Approval
from approvals.services import decide
from keys.backends.base import BackendUnavailable, KeyBackendError
from keys.registry import backend_for
from provenance.models import ProvenanceRecord
from signing_service import bundle, signing, slsa
from signing_service.client.cli import main
from signing_service.models import AuditEntry, RequestState, Signature, SigningRequest
from tests.fixtures_service import (
    authed,
    model_signing_verify,
    reference_resources,
    request_body,
    write_model,
)
from tests.provenance_helpers import bundle_payload, model_meta, root_of, statement
from tests.test_trust_verify import fetch

URL = "/api/v1/signing-requests/"


def write_statement(path: Path, model: Path, *, envelope: bool = False, **changes: Any) -> Path:
    doc = statement(root_of(reference_resources(model)), name=model.name, **changes)
    if envelope:  # as a builder's .intoto.jsonl: a DSSE envelope around the statement
        payload = base64.b64encode(json.dumps(doc).encode()).decode()
        doc = {"payloadType": bundle.PAYLOAD_TYPE, "payload": payload, "signatures": []}
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.softhsm
@pytest.mark.interop
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("envelope", [False, True], ids=["statement", "dsse-envelope"])
def test_sign_with_provenance_end_to_end(
    live_server: Any,
    issue_token: Any,
    active_keys: Any,
    tmp_path: Path,
    capsys: Any,
    envelope: bool,
) -> None:
    model = write_model(tmp_path / "resnet", {"weights.bin": b"w" * 4096, "cfg.json": b"{}"})
    prov = write_statement(tmp_path / "provenance.json", model, envelope=envelope)
    out = tmp_path / "out" / "model.sig"
    out.parent.mkdir()
    argv = ["sign", str(model), "--server", live_server.url, "--environment", "staging",
            "--token", issue_token(), "--out", str(out), "--provenance", str(prov), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    written = Path(f"{out}.provenance")
    assert capsys.readouterr().out.split() == [str(out), str(written)]

    # The reference verifier accepts the model bundle, provenance block and all.
    pem = tmp_path / "staging.pem"
    pem.write_text(active_keys["staging"].public_key_pem)
    result = model_signing_verify(model, out, pem)
    assert result.returncode == 0, result.stdout + result.stderr

    # Both bundles, by the same key; the model's statement names the provenance's digest.
    key = bundle.load_public_key(active_keys["staging"].public_key_pem)
    verified = slsa.verify_bundle(written.read_bytes(), key)
    assert model_meta(out.read_bytes())["provenance"]["statement_digest"] == verified.payload_digest
    assert (
        verified.provenance.subject_digest
        == bundle.verify_bundle(out.read_bytes(), key).root_digest
    )

    # And the deployment gate (staging_deployment requires provenance) accepts both.
    pin = tmp_path / "pin.pem"
    pin.write_text(active_keys["staging"].public_key_pem)
    trust = tmp_path / "trust.json"
    assert fetch(live_server.url, trust, "--pin-key", str(pin)) == 0
    capsys.readouterr()
    verify = ["verify", str(model), "--signature", str(out), "--trust", str(trust),
              "--deployment", "staging_deployment", "--provenance-signature", str(written)]  # fmt: skip
    assert main(verify) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("PASS  provenance bundle: valid") for line in lines), lines
    assert lines[-1] == "ACCEPT for staging_deployment"


@pytest.mark.softhsm
@pytest.mark.django_db(transaction=True)
def test_the_client_refuses_provenance_for_other_content_before_submitting(
    live_server: Any, issue_token: Any, active_keys: Any, tmp_path: Path, capsys: Any
) -> None:
    model = write_model(tmp_path / "m", {"weights.bin": b"w"})
    other = write_model(tmp_path / "other", {"weights.bin": b"x"})
    prov = write_statement(tmp_path / "provenance.json", other)
    argv = ["sign", str(model), "--server", live_server.url, "--environment", "staging",
            "--token", issue_token(), "--out", str(tmp_path / "m.sig"), "--provenance", str(prov),
            "--quiet"]  # fmt: skip
    assert main(argv) == 1
    assert "is for other content: its subject digest is" in capsys.readouterr().err
    assert SigningRequest.objects.count() == 0 and not (tmp_path / "m.sig").exists()


# --- both signatures or neither ----------------------------------------------------------


def submit(api: Any, token: str, environment: str = "staging", **changes: Any) -> dict[str, Any]:
    body = request_body(environment=environment)
    body["provenance"] = statement(root_of(body["resources"]), **changes)
    response = authed(api, token).post(URL, body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def failing_on_provenance(monkeypatch: Any, key: Any, error: Exception) -> None:
    """The backend signs the model's statement but fails on the provenance statement."""
    backend = backend_for(key)
    real = backend.sign

    def sign(key_ref: Any, pae_bytes: bytes) -> bytes:
        if slsa.SLSA_PREDICATE_TYPE.encode() in pae_bytes and b"model_signing" not in pae_bytes:
            raise error
        return real(key_ref, pae_bytes)

    monkeypatch.setattr(backend, "sign", sign)


def stored(request_id: str) -> tuple[int, str, list[str]]:
    actions = AuditEntry.objects.filter(
        action__in=("signature.issued", "provenance.signed")
    ).values_list("action", flat=True)
    record = ProvenanceRecord.objects.get(pk=request_id)
    return Signature.objects.filter(request_id=request_id).count(), record.bundle, list(actions)


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_failed_provenance_signature_stores_neither(
    api: Any, issue_token: Any, active_keys: Any, monkeypatch: Any
) -> None:
    failing_on_provenance(
        monkeypatch, active_keys["staging"], KeyBackendError("CKR_FUNCTION_FAILED")
    )
    req = submit(api, issue_token())
    assert req["state"] == "failed" and "CKR_FUNCTION_FAILED" in req["failure_reason"]
    assert stored(req["id"]) == (0, "", [])


@pytest.mark.softhsm
@pytest.mark.django_db
def test_an_unavailable_backend_for_the_provenance_makes_the_request_wait(
    api: Any, issue_token: Any, active_keys: Any, monkeypatch: Any
) -> None:
    failing_on_provenance(monkeypatch, active_keys["staging"], BackendUnavailable("token removed"))
    req = submit(api, issue_token())
    assert req["state"] == "approved" and "token removed" in req["waiting_reason"]
    assert stored(req["id"]) == (0, "", [])
    monkeypatch.undo()  # the token is back: the retry signs both
    signed = signing.sign(req["id"])
    assert signed.state == RequestState.SIGNED
    count, provenance_bundle, actions = stored(req["id"])
    assert (count, sorted(actions)) == (1, ["provenance.signed", "signature.issued"])
    key = bundle.load_public_key(active_keys["staging"].public_key_pem)
    assert (
        slsa.verify_bundle(provenance_bundle, key).provenance.subject_digest == signed.root_digest
    )


# --- approvals are bound to the provenance ------------------------------------------------


def approve(req_id: str, user: Any) -> Any:
    return decide(req_id, user, "approve", otp_verified_at=timezone.now())


@pytest.mark.softhsm
@pytest.mark.django_db
def test_an_approval_does_not_survive_a_provenance_change(
    api: Any, issue_token: Any, active_keys: Any, make_user: Any
) -> None:
    req = submit(api, issue_token(authorities=("production",)), environment="production")
    assert req["state"] == "pending_approval"
    approve(req["id"], make_user("alice"))
    assert Approval.objects.get().statement_digest == req["statement_digest"]

    # The provenance is swapped for another build of the same model after alice approved,
    # consistently (its own digest updated): the request's statement digest no longer holds.
    record = ProvenanceRecord.objects.get(pk=req["id"])
    swapped = slsa.parse_statement(
        statement(record.subject_digest, invocation="https://ci.example/another-run")
    )
    ProvenanceRecord.objects.filter(pk=record.pk).update(
        statement=swapped.statement, statement_digest=swapped.digest
    )
    outcome = approve(req["id"], make_user("bob"))
    assert outcome.request.state == RequestState.FAILED
    assert "statement no longer matches its digest" in outcome.request.failure_reason
    assert stored(req["id"])[:2] == (0, "")


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_provenance_edited_behind_its_digest_is_not_signed(
    api: Any, issue_token: Any, active_keys: Any, make_user: Any
) -> None:
    req = submit(api, issue_token(authorities=("production",)), environment="production")
    approve(req["id"], make_user("alice"))
    record = ProvenanceRecord.objects.get(pk=req["id"])
    edited = dict(record.statement)
    edited["predicate"] = {**edited["predicate"], "byproducts": [{"name": "smuggled"}]}
    ProvenanceRecord.objects.filter(pk=record.pk).update(statement=edited)
    outcome = approve(req["id"], make_user("bob"))
    assert outcome.request.state == RequestState.FAILED
    assert "provenance no longer matches its digest" in outcome.request.failure_reason
    assert stored(req["id"])[:2] == (0, "")


@pytest.mark.softhsm
@pytest.mark.django_db
def test_two_approvals_sign_the_provenance_they_saw(
    api: Any, issue_token: Any, active_keys: Any, make_user: Any
) -> None:
    req = submit(api, issue_token(authorities=("production",)), environment="production")
    approve(req["id"], make_user("alice"))
    outcome = approve(req["id"], make_user("bob"))
    assert outcome.request.state == RequestState.SIGNED
    record = ProvenanceRecord.objects.get(pk=req["id"])
    model = outcome.request.valid_signature().bundle.encode()
    meta = model_meta(model)
    assert meta["statement_digest"] == req["statement_digest"]
    assert meta["provenance"]["statement_digest"] == record.statement_digest
    assert {a["approver"] for a in meta["approvals"]} == {"alice@company.com", "bob@company.com"}
    assert bundle_payload(record.bundle.encode()) == record.payload


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sign", "m", "--server", "http://127.0.0.1:9", "--environment", "staging",
          "--token", "t", "--provenance-out", "x.provenance"], "--provenance-out needs --provenance"),
        (["verify", "m", "--signature", "m.sig", "--public-key", "k.pem",
          "--provenance-signature", "m.sig.provenance"], "apply with --deployment"),
    ],
    ids=["out-without-provenance", "verify-without-deployment"],
)  # fmt: skip
def test_provenance_options_need_their_partner(
    argv: list[str], expected: str, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert main(argv) == 1
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing written
