"""`modelsign trust fetch` and `modelsign verify --trust`, end to end against the real
service (live server, SoftHSM keys): key states and windows at the signing time decide."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keys.lifecycle import transition
from keys.models import KeyState
from signing_service import bundle
from signing_service.client import cli
from signing_service.client import trust as client_trust
from tests.fixtures_service import authed, request_body, write_model

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]

MODEL = {"weights.bin": b"\x01" * 2048, "config.json": b'{"layers": 2}'}


@pytest.fixture
def signed_model(
    api: Any, issue_token: Callable[..., str], active_keys: Any, tmp_path: Path
) -> tuple[Path, Path]:
    """A model signed by the staging key through the API: (model dir, bundle outside it)."""
    model = write_model(tmp_path / "model", MODEL)
    client = authed(api, issue_token())
    response = client.post("/api/v1/signing-requests/", request_body(model), format="json")
    assert response.status_code == 201, response.content
    assert response.json()["state"] == "signed"
    bundle_response = client.get(f"/api/v1/signing-requests/{response.json()['id']}/bundle")
    assert bundle_response.status_code == 200
    signature = tmp_path / "model.sig"
    signature.write_bytes(bundle_response.content)
    return model, signature


@pytest.fixture
def pin(active_keys: Any, tmp_path: Path) -> Path:
    """The production public key, as an operator would hand it out of band."""
    path = tmp_path / "production.pem"
    path.write_text(active_keys["production"].public_key_pem)
    return path


def fetch(server: str, out: Path, *anchor: str) -> int:
    return cli.main(["trust", "fetch", "--server", server, "--out", str(out), "--quiet", *anchor])


def verify(model: Path, signature: Path, trust_file: Path, *extra: str) -> int:
    argv = ["verify", str(model), "--signature", str(signature), "--trust", str(trust_file)]
    return cli.main([*argv, "--quiet", *extra])


def signed_at(signature: Path) -> datetime:
    envelope = bundle.parse_bundle(signature.read_bytes())["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    return datetime.fromisoformat(statement["predicate"][bundle.SERVICE_PREDICATE_KEY]["signed_at"])


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


# --- key states ------------------------------------------------------------------------


def test_accepted_in_transition_then_rejected_when_retired(
    live_server: Any,
    signed_model: tuple[Path, Path],
    pin: Path,
    active_keys: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, signature = signed_model
    staging = active_keys["staging"]
    trust1 = tmp_path / "trust1.json"
    assert fetch(live_server.url, trust1, "--pin-key", str(pin)) == 0
    assert verify(model, signature, trust1) == 0
    assert capsys.readouterr().out.splitlines() == [str(trust1), "Verification succeeded"]

    transition(staging.pk, KeyState.TRANSITION, actor="custodian")
    trust2 = tmp_path / "trust2.json"
    assert fetch(live_server.url, trust2, "--previous", str(trust1)) == 0
    assert verify(model, signature, trust2) == 0  # inside transition_until
    later = (datetime.now(UTC) + timedelta(days=31)).isoformat()
    assert verify(model, signature, trust2, "--at", later) == 1
    error = last_error(capsys)
    assert "transition" in error and "window ended" in error

    transition(staging.pk, KeyState.RETIRED, actor="custodian")
    trust3 = tmp_path / "trust3.json"
    assert fetch(live_server.url, trust3, "--previous", str(trust2)) == 0
    assert verify(model, signature, trust3) == 1
    assert "retired" in last_error(capsys)


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(timedelta(hours=1), True), (timedelta(0), False), (-timedelta(seconds=1), False)],
    ids=["effective-after-signature", "effective-at-signature", "effective-before-signature"],
)
def test_revocation_effective_time_decides(
    live_server: Any,
    signed_model: tuple[Path, Path],
    pin: Path,
    active_keys: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    offset: timedelta,
    accepted: bool,
) -> None:
    model, signature = signed_model
    effective = signed_at(signature) + offset
    staging = active_keys["staging"]
    transition(
        staging.pk, KeyState.REVOKED, actor="ir", reason="compromised", effective_at=effective
    )
    trust_file = tmp_path / "trust.json"
    assert fetch(live_server.url, trust_file, "--pin-key", str(pin)) == 0
    assert verify(model, signature, trust_file) == (0 if accepted else 1)
    if not accepted:
        error = last_error(capsys)
        assert "revoked (compromised)" in error and "at or after" in error


def test_unknown_key_is_rejected(
    live_server: Any, pin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path / "model", MODEL)
    signature = tmp_path / "model.sig"
    signature.write_bytes(sign_locally(model))
    trust_file = tmp_path / "trust.json"
    assert fetch(live_server.url, trust_file, "--pin-key", str(pin)) == 0
    assert verify(model, signature, trust_file) == 1
    assert "is not in" in last_error(capsys)


def test_a_changed_model_still_fails_the_re_hash(
    live_server: Any,
    signed_model: tuple[Path, Path],
    pin: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, signature = signed_model
    trust_file = tmp_path / "trust.json"
    assert fetch(live_server.url, trust_file, "--pin-key", str(pin)) == 0
    (model / "config.json").write_bytes(b'{"layers": 3}')
    assert verify(model, signature, trust_file) == 1
    assert "changed file: config.json" in capsys.readouterr().err


# --- the trust file itself -------------------------------------------------------------


@pytest.mark.parametrize("where", ["public-key", "substituted-key", "state", "signature"])
def test_a_tampered_trust_file_is_rejected(
    live_server: Any,
    signed_model: tuple[Path, Path],
    pin: Path,
    active_keys: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    model, signature = signed_model
    trust_file = tmp_path / "trust.json"
    assert fetch(live_server.url, trust_file, "--pin-key", str(pin)) == 0
    tamper(trust_file, where, active_keys["staging"].hint)
    assert verify(model, signature, trust_file) == 1
    assert "--trust" in last_error(capsys)


def tamper(path: Path, where: str, hint: str) -> None:
    envelope = json.loads(path.read_bytes())
    if where == "signature":  # every signature loses one byte's worth of validity
        for sig in envelope["signatures"]:
            raw = bytearray(base64.b64decode(sig["sig"]))
            raw[-1] ^= 1
            sig["sig"] = base64.b64encode(raw).decode()
    else:
        doc = json.loads(base64.b64decode(envelope["payload"]))
        entry = next(k for k in doc["keys"] if k["hint"] == hint)
        if where == "state":
            entry["state"] = "retired"
        elif where == "substituted-key":  # a well-formed key of the attacker's, hint and all
            public = ec.generate_private_key(ec.SECP256R1()).public_key()
            entry["public_key_pem"] = bundle.public_key_pem(public)
            entry["hint"] = bundle.key_hint(public)
        else:  # one byte of the public key's PEM
            pem = entry["public_key_pem"]
            i = pem.index("\n") + 40
            entry["public_key_pem"] = pem[:i] + ("A" if pem[i] != "A" else "B") + pem[i + 1 :]
        envelope["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    path.write_text(json.dumps(envelope))


def test_fetch_with_a_wrong_pinned_key_refuses(
    live_server: Any, active_keys: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.pem"
    wrong.write_text(bundle.public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    out = tmp_path / "trust.json"
    assert fetch(live_server.url, out, "--pin-key", str(wrong)) == 1
    assert "not signed by any key you trust" in last_error(capsys)
    assert not out.exists()


def test_first_use_needs_an_anchor_or_explicit_tofu(
    live_server: Any, active_keys: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trust.json"
    assert fetch(live_server.url, out) == 1
    assert "--trust-on-first-use" in last_error(capsys)
    assert not out.exists()
    assert fetch(live_server.url, out, "--trust-on-first-use") == 0
    err = capsys.readouterr().err
    for key in active_keys.values():
        assert f"trusting on first use: {key.authority} key {key.hint[:16]}" in err
        assert f"sha256:{key.hint}" in err
    client_trust.load_verified(out.read_bytes())  # written as fetched, verifiable offline


def test_previous_refuses_a_rollback(
    live_server: Any,
    pin: Path,
    active_keys: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert fetch(live_server.url, old, "--pin-key", str(pin)) == 0
    transition(active_keys["staging"].pk, KeyState.TRANSITION, actor="custodian")
    assert fetch(live_server.url, new, "--previous", str(old)) == 0
    # A server (or a man in the middle) replaying the older, validly signed document:
    monkeypatch.setattr(client_trust, "fetch", lambda client: old.read_bytes())
    assert fetch(live_server.url, tmp_path / "x.json", "--previous", str(new)) == 1
    assert "rollback" in last_error(capsys)


def test_trust_and_public_key_are_exclusive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", str(tmp_path), "--signature", "s", "--trust", "t", "--public-key", "k"]
    assert cli.main(argv) == 1
    assert "not allowed with argument" in capsys.readouterr().err


# --- check_key rules, without a server -------------------------------------------------

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def rule_key(state: str, **fields: Any) -> client_trust.TrustKey:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    key = client_trust.TrustKey(
        authority="staging", hint=bundle.key_hint(public), algorithm="ECDSA-P256",
        public_key=public, state=state, not_before=T0, not_after=T0 + timedelta(days=365),
        transition_until=None, revoked_at=None, revocation_effective_at=None,
        revocation_reason="",
    )  # fmt: skip
    return replace(key, **fields)


def rule_doc(key: client_trust.TrustKey) -> client_trust.TrustDocument:
    return client_trust.TrustDocument(
        version=1, issued_at=T0, keys={key.hint: key}, authorities={},
        verification_policy={}, payload=b"", signatures=(),
    )  # fmt: skip


DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("key", "signed", "now", "reason"),
    [
        (rule_key("active"), T0 + DAY, T0 + 2 * DAY, None),
        (rule_key("active"), T0 - DAY, T0 + DAY, "outside"),
        (rule_key("active"), T0 + 366 * DAY, T0 + 367 * DAY, "outside"),
        (rule_key("active"), T0 + 3 * DAY, T0 + DAY, "after the verification time"),
        (rule_key("transition", transition_until=T0 + 9 * DAY), T0 + DAY, T0 + 8 * DAY, None),
        (
            rule_key("transition", transition_until=T0 + 9 * DAY),
            T0 + DAY,
            T0 + 9 * DAY,
            "window ended",
        ),
        (rule_key("transition"), T0 + DAY, T0 + 2 * DAY, "no end of window"),
        (rule_key("retired"), T0 + DAY, T0 + 2 * DAY, "retired"),
        (rule_key("revoked", revocation_effective_at=T0 + 5 * DAY), T0 + DAY, T0 + 9 * DAY, None),
        (
            rule_key("revoked", revocation_effective_at=T0 + 5 * DAY),
            T0 + 5 * DAY,
            T0 + 9 * DAY,
            "at or after",
        ),
        (rule_key("revoked"), T0 + DAY, T0 + 2 * DAY, "revoked"),
        (rule_key("pending"), T0 + DAY, T0 + 2 * DAY, "pending"),
    ],
)
def test_check_key_rules(
    key: client_trust.TrustKey, signed: datetime, now: datetime, reason: str | None
) -> None:
    doc = rule_doc(key)
    if reason is None:
        assert client_trust.check_key(doc, key.hint, signed, now) is key
    else:
        with pytest.raises(client_trust.TrustError, match=reason):
            client_trust.check_key(doc, key.hint, signed, now)


def sign_locally(model: Path) -> bytes:
    """A bundle by a key the service never heard of (statement as the service builds it)."""
    from signing_service.client import hashing

    private = ec.generate_private_key(ec.SECP256R1())
    result = hashing.hash_files(hashing.scan_model(model))
    payload = bundle.statement_payload(
        bundle.build_statement(model.name, result.resources, ignore_paths=result.ignore_paths)
    )
    der = private.sign(bundle.pae(payload), ec.ECDSA(bundle.curve_hash(private.public_key())))
    hint = bundle.key_hint(private.public_key())
    return bundle.bundle_bytes(bundle.build_bundle(payload, der, hint=hint))
