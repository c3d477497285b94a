"""Audit checkpoints: the checkpoint key signs the audit log's head, and verify_audit uses the
signatures to catch a log rewritten (hash chain recomputed) or truncated after a checkpoint.

The checkpoint key lives on a SoftHSM token of its own and can never sign a model.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from keys import registry, softhsm
from keys.backends.base import BackendUnavailable
from keys.models import KeyState, SigningKey
from signing_service import audit, bundle
from signing_service import audit_checkpoints as checkpoints
from signing_service.models import AuditCheckpoint, AuditEntry, AuditHead, Signature
from signing_service.policy import CHECKPOINT_AUTHORITY, PolicyError, current_policy, parse_policy
from tests.fixtures_service import authed, request_body
from tests.redis_fixtures import WorkerProcess
from tests.softhsm_fixtures import SoftHSMToken, random_label

pytestmark = pytest.mark.softhsm

POLICY_EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "policy.example.yaml"


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_hsm_token(softhsm_token: SoftHSMToken) -> SoftHSMToken:
    """A token of its own for the checkpoint key, next to the signing keys' session token."""
    return softhsm_token.new_token(random_label("checkpoint"))


@pytest.fixture
def checkpoint_token(
    hsm: SoftHSMToken, checkpoint_hsm_token: SoftHSMToken, settings: Any, tmp_path: Path
) -> SoftHSMToken:
    pin_file = tmp_path / "audit-checkpoint.pin"
    pin_file.write_text(checkpoint_hsm_token.user_pin + "\n")
    pin_file.chmod(0o600)
    settings.AUDIT_CHECKPOINT_TOKEN = checkpoint_hsm_token.token_label
    settings.AUDIT_CHECKPOINT_PIN_FILE = pin_file
    registry.reset()
    return checkpoint_hsm_token


@pytest.fixture
def checkpoint_key(checkpoint_token: SoftHSMToken, db: None) -> SigningKey:
    return checkpoints.create_key("tests")


def append(n: int) -> None:
    for i in range(n):
        with transaction.atomic():
            audit.record("tester", "test.event", data={"i": i})


def raw_sql(sql: str, *params: Any) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def recompute_chain_from(seq: int) -> None:
    """What someone with write access to the database can do: recompute every hash from
    ``seq`` on, and the head, so that the hash chain alone verifies again."""
    prev = AuditEntry.objects.get(seq=seq - 1).entry_hash if seq > 1 else audit.GENESIS
    for entry in AuditEntry.objects.filter(seq__gte=seq).order_by("seq"):
        digest = audit.entry_hash(
            seq=entry.seq, created_at=entry.created_at.isoformat(), actor=entry.actor,
            action=entry.action, target_type=entry.target_type, target_id=entry.target_id,
            data=entry.data, prev_hash=prev,
        )  # fmt: skip
        raw_sql(
            "UPDATE signing_service_auditentry SET prev_hash = %s, entry_hash = %s WHERE seq = %s",
            prev,
            digest,
            entry.seq,
        )
        prev = digest
    last = AuditEntry.objects.order_by("-seq").first()
    raw_sql(
        "UPDATE signing_service_audithead SET seq = %s, entry_hash = %s WHERE id = 1",
        last.seq if last else 0,
        prev,
    )


def hsm_public_pem(key: SigningKey, tmp_path: Path) -> Path:
    """The checkpoint public key read from the token itself, as an auditor would keep it."""
    public = checkpoints.checkpoint_backend().public_key(key.key_ref)
    path = tmp_path / f"checkpoint-{key.fingerprint}.pem"
    path.write_text(bundle.public_key_pem(public))
    return path


def run(*args: str) -> str:
    """A management command's output."""
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def verify_audit(*args: str) -> str:
    return run("verify_audit", *args)


# --- making and verifying checkpoints ----------------------------------------------------


@pytest.mark.django_db
def test_a_checkpoint_verifies(checkpoint_key: SigningKey, tmp_path: Path) -> None:
    append(5)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None and made.number == 1
    assert made.key == checkpoint_key and made.seq == AuditHead.objects.get().seq

    # Checked here with plain `cryptography`, independently of the module's own verifier.
    envelope = json.loads(made.envelope)
    assert envelope["payloadType"] == checkpoints.CHECKPOINT_PAYLOAD_TYPE
    [signature] = envelope["signatures"]
    assert signature["keyid"] == checkpoint_key.hint
    payload = base64.b64decode(envelope["payload"])
    public = bundle.load_public_key(hsm_public_pem(checkpoint_key, tmp_path).read_text())
    public.verify(
        base64.b64decode(signature["sig"]),
        bundle.pae(payload, checkpoints.CHECKPOINT_PAYLOAD_TYPE),
        ec.ECDSA(bundle.curve_hash(public)),
    )
    signed = json.loads(payload)
    assert signed == {
        "type": "modelsign-audit-checkpoint", "number": 1, "seq": made.seq,
        "entry_hash": AuditEntry.objects.get(seq=made.seq).entry_hash,
        "created_at": signed["created_at"], "key": checkpoint_key.hint,
    }  # fmt: skip

    out = verify_audit()
    assert f"audit log OK: {made.seq} entries, chain intact; 1 checkpoint(s) verified" in out
    out = verify_audit("--checkpoint-key", str(hsm_public_pem(checkpoint_key, tmp_path)))
    assert "1 checkpoint(s) verified, the newest #1" in out


@pytest.mark.django_db
def test_the_checkpoint_is_audited_and_signs_its_own_audit_record(
    checkpoint_key: SigningKey,
) -> None:
    append(2)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None
    entry = AuditEntry.objects.get(seq=made.seq)
    assert entry.action == "audit.checkpoint" and entry.actor == "tester"
    assert entry.data["number"] == 1 and entry.data["key"] == checkpoint_key.hint
    assert made.entry_hash == entry.entry_hash


@pytest.mark.django_db
def test_no_new_checkpoint_when_the_head_did_not_move(checkpoint_key: SigningKey) -> None:
    append(3)
    first = checkpoints.create_checkpoint("tester")
    entries = AuditEntry.objects.count()
    assert first is not None
    assert checkpoints.create_checkpoint("tester") is None
    out = run("audit_checkpoint")
    assert "no new checkpoint" in out
    assert AuditCheckpoint.objects.count() == 1
    assert AuditEntry.objects.count() == entries  # not even an audit record for nothing

    append(1)
    second = checkpoints.create_checkpoint("tester")
    assert second is not None and second.number == 2 and second.seq == entries + 2


@pytest.mark.django_db
def test_a_key_that_cannot_sign_leaves_neither_checkpoint_nor_audit_record(
    checkpoint_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(2)
    head = AuditHead.objects.get().seq
    backend = checkpoints.checkpoint_backend()

    def down(key_ref: Any, pae_bytes: bytes) -> bytes:
        raise BackendUnavailable("token removed")

    monkeypatch.setattr(backend, "sign", down)
    with pytest.raises(checkpoints.CheckpointUnavailable, match="could not sign: token removed"):
        checkpoints.create_checkpoint("tester")
    assert AuditCheckpoint.objects.count() == 0
    assert AuditHead.objects.get().seq == head == AuditEntry.objects.count()


@pytest.mark.django_db
def test_a_rewrite_with_the_whole_chain_recomputed_is_caught(
    checkpoint_key: SigningKey, tmp_path: Path
) -> None:
    append(5)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None
    append(3)
    raw_sql("UPDATE signing_service_auditentry SET actor = 'mallory' WHERE seq = 2")
    recompute_chain_from(2)

    assert audit.verify_chain()[1] is None  # the hash chain alone is fooled
    pem = str(hsm_public_pem(checkpoint_key, tmp_path))
    with pytest.raises(CommandError) as caught:
        verify_audit("--checkpoint-key", pem)
    message = str(caught.value)
    assert f"checkpoint #1 FAILS: entry {made.seq} has hash" in message
    assert f"the log up to entry {made.seq} was rewritten" in message
    # and the signer refuses to vouch for the rewritten log
    with pytest.raises(checkpoints.CheckpointError, match="no longer matches checkpoint #1"):
        checkpoints.create_checkpoint("tester")


@pytest.mark.django_db
def test_truncation_after_a_checkpoint_is_caught(checkpoint_key: SigningKey) -> None:
    append(5)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None
    append(3)
    raw_sql("DELETE FROM signing_service_auditentry WHERE seq > 3")
    recompute_chain_from(4)  # only the head row: nothing is left after entry 3

    assert audit.verify_chain() == (3, None)
    with pytest.raises(CommandError, match=rf"checkpoint #1 FAILS: entry {made.seq}, which it "
                       "signs, is missing: the log was truncated"):  # fmt: skip
        verify_audit()


@pytest.mark.django_db
def test_a_copy_kept_outside_catches_truncation_even_with_the_checkpoints_removed(
    checkpoint_key: SigningKey, tmp_path: Path
) -> None:
    append(2)
    checkpoints.create_checkpoint("tester")
    append(2)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None
    kept = tmp_path / "checkpoint-2.json"
    kept.write_text(made.envelope)
    pem = str(hsm_public_pem(checkpoint_key, tmp_path))
    assert "checkpoint file" in verify_audit(
        "--checkpoint-key", pem, "--checkpoint-file", str(kept)
    )

    # Cut the log back before checkpoint #2 and remove every trace of it from the database.
    raw_sql("DELETE FROM signing_service_auditcheckpoint WHERE number = 2")
    raw_sql("DELETE FROM signing_service_auditentry WHERE seq > %s", made.seq - 2)
    recompute_chain_from(made.seq - 1)
    assert "1 checkpoint(s) verified" in verify_audit("--checkpoint-key", pem)  # looks fine...
    with pytest.raises(CommandError) as caught:  # ...to anyone without a copy
        verify_audit("--checkpoint-key", pem, "--checkpoint-file", str(kept))
    assert f"entry {made.seq}, which it signs, is missing" in str(caught.value)
    assert "the database has no checkpoint #2" in str(caught.value)


@pytest.mark.django_db
def test_a_removed_checkpoint_is_caught(checkpoint_key: SigningKey) -> None:
    for _ in range(3):
        append(1)
        checkpoints.create_checkpoint("tester")
    second = AuditCheckpoint.objects.get(number=2)
    raw_sql("DELETE FROM signing_service_auditcheckpoint WHERE number = 2")
    with pytest.raises(CommandError) as caught:
        verify_audit()
    assert (
        "checkpoint #2 FAILS: it is missing (the next is #3); the log records it at entry "
        f"{second.seq}, but it is not in the database"
    ) in str(caught.value)


@pytest.mark.django_db
def test_a_forged_checkpoint_signature_is_caught(
    checkpoint_key: SigningKey, tmp_path: Path
) -> None:
    append(3)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None
    envelope = json.loads(made.envelope)
    payload = base64.b64decode(envelope["payload"])
    forger = ec.generate_private_key(ec.SECP256R1())
    forged_sig = forger.sign(
        bundle.pae(payload, checkpoints.CHECKPOINT_PAYLOAD_TYPE),
        ec.ECDSA(bundle.curve_hash(forger.public_key())),
    )
    envelope["signatures"][0]["sig"] = base64.b64encode(forged_sig).decode()
    raw_sql(
        "UPDATE signing_service_auditcheckpoint SET envelope = %s WHERE id = %s",
        json.dumps(envelope),
        made.pk,
    )
    with pytest.raises(
        CommandError,
        match=f"checkpoint #1 FAILS: its signature does not verify with checkpoint key "
        f"{checkpoint_key.hint[:16]}",
    ):
        verify_audit()


@pytest.mark.django_db
def test_a_checkpoint_key_replaced_in_the_database_is_caught_by_the_key_held_outside(
    checkpoint_key: SigningKey, tmp_path: Path
) -> None:
    """Someone who rewrites the log, re-signs every checkpoint with a key of their own and
    swaps the key record: only the public key kept outside the database catches it."""
    pem = str(hsm_public_pem(checkpoint_key, tmp_path))
    append(3)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None
    forger = ec.generate_private_key(ec.SECP256R1())
    forger_hint = bundle.key_hint(forger.public_key())
    head = json.loads(base64.b64decode(json.loads(made.envelope)["payload"]))
    head["key"] = forger_hint
    signed = checkpoints.SignedHead(**{k: v for k, v in head.items() if k != "type"})
    sig = forger.sign(
        bundle.pae(signed.payload(), checkpoints.CHECKPOINT_PAYLOAD_TYPE),
        ec.ECDSA(bundle.curve_hash(forger.public_key())),
    )
    raw_sql(
        "UPDATE signing_service_auditcheckpoint SET envelope = %s WHERE id = %s",
        checkpoints.make_envelope(signed, sig),
        made.pk,
    )
    raw_sql(
        "UPDATE keys_signingkey SET public_key_pem = %s, hint = %s WHERE id = %s",
        bundle.public_key_pem(forger.public_key()),
        forger_hint,
        checkpoint_key.pk,
    )
    with pytest.raises(
        CommandError,
        match=f"checkpoint #1 FAILS: it is signed by key {forger_hint[:16]}, which is not a "
        "trusted checkpoint key",
    ):
        verify_audit("--checkpoint-key", pem)


@pytest.mark.django_db
def test_a_rotated_key_keeps_old_checkpoints_verifiable(
    checkpoint_key: SigningKey, tmp_path: Path
) -> None:
    old_pem = str(hsm_public_pem(checkpoint_key, tmp_path))
    append(1)
    checkpoints.create_checkpoint("tester")
    new_key = checkpoints.create_key("tests", rotate=True)
    append(1)
    made = checkpoints.create_checkpoint("tester")
    assert made is not None and made.key == new_key
    assert SigningKey.objects.get(pk=checkpoint_key.pk).state == KeyState.TRANSITION
    new_pem = str(hsm_public_pem(new_key, tmp_path))
    assert "2 checkpoint(s) verified" in verify_audit("--checkpoint-key", old_pem,
                                                      "--checkpoint-key", new_pem)  # fmt: skip
    with pytest.raises(CommandError, match="checkpoint #1 FAILS: it is signed by key"):
        verify_audit("--checkpoint-key", new_pem)


@pytest.mark.django_db
def test_checkpoints_signed_after_the_keys_revocation_fail(checkpoint_key: SigningKey) -> None:
    append(1)
    checkpoints.create_checkpoint("tester")
    append(1)
    second = checkpoints.create_checkpoint("tester")
    assert second is not None
    first_time = AuditCheckpoint.objects.get(number=1).created_at
    effective = first_time + (second.created_at - first_time) / 2  # between the two
    run("revoke_key", checkpoint_key.hint[:16], "--reason", "compromised",
        "--effective-at", effective.isoformat())  # fmt: skip
    with pytest.raises(CommandError) as caught:
        verify_audit()
    message = str(caught.value)
    assert "checkpoint #2 FAILS: it was signed at" in message
    assert "at or after its key's revocation" in message
    assert "checkpoint #1" not in message
    with pytest.raises(checkpoints.CheckpointUnavailable, match="no active audit checkpoint key"):
        checkpoints.create_checkpoint("tester")


@pytest.mark.django_db
def test_bad_checkpoint_key_files_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"--checkpoint-key: cannot read .*missing\.pem"):
        verify_audit("--checkpoint-key", str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(CommandError, match="--checkpoint-key: not a PEM public key"):
        verify_audit("--checkpoint-key", str(junk))


# --- the checkpoint key signs nothing else ------------------------------------------------


def test_the_policy_refuses_the_reserved_authority_name() -> None:
    doc = yaml.safe_load(POLICY_EXAMPLE.read_bytes())
    authorities = doc["certificate_policy"]["signing_authorities"]
    authorities[CHECKPOINT_AUTHORITY] = authorities["production"]
    with pytest.raises(PolicyError) as caught:
        parse_policy(yaml.safe_dump(doc).encode())
    assert caught.value.field == f"certificate_policy.signing_authorities.{CHECKPOINT_AUTHORITY}"
    assert "reserved for the audit checkpoint key" in str(caught.value)


@pytest.mark.django_db
def test_the_checkpoint_key_never_signs_a_model(
    checkpoint_key: SigningKey, active_keys: dict[str, SigningKey], api: Any, issue_token: Any
) -> None:
    for name in current_policy().authorities:
        assert SigningKey.objects.active_for(name) != checkpoint_key
    token = issue_token(authorities=("staging", CHECKPOINT_AUTHORITY))
    response = authed(api, token).post(
        "/api/v1/signing-requests/", request_body(environment=CHECKPOINT_AUTHORITY), format="json"
    )
    assert 400 <= response.status_code < 500, response.content
    assert not Signature.objects.filter(key=checkpoint_key).exists()

    # Nor does it sign the trust document or appear in it: verifiers never accept it.
    from signing_service import trust

    document = trust.current_document()
    assert checkpoint_key.hint not in document.signed_by
    assert checkpoint_key.hint not in {k["hint"] for k in trust.document_content()["keys"]}


@pytest.mark.django_db
def test_the_checkpoint_key_needs_a_token_of_its_own(
    checkpoint_token: SoftHSMToken, hsm: SoftHSMToken, settings: Any
) -> None:
    settings.AUDIT_CHECKPOINT_TOKEN = hsm.token_label  # the signing keys' token
    with pytest.raises(checkpoints.CheckpointUnavailable, match="needs a token of its own"):
        checkpoints.create_key("tests")
    assert not SigningKey.objects.filter(authority=CHECKPOINT_AUTHORITY).exists()


@pytest.mark.django_db
def test_without_a_checkpoint_key_the_command_says_how_to_make_one(
    checkpoint_token: SoftHSMToken,
) -> None:
    with pytest.raises(CommandError, match="audit_checkpoint --create-key"):
        call_command("audit_checkpoint")


@pytest.mark.django_db
def test_the_commands_create_the_key_and_a_checkpoint(
    checkpoint_token: SoftHSMToken, tmp_path: Path
) -> None:
    out = run("audit_checkpoint", "--create-key", "--actor", "custodian lee")
    key = SigningKey.objects.get(authority=CHECKPOINT_AUTHORITY, state=KeyState.ACTIVE)
    assert key.public_key_pem in out
    assert run("audit_checkpoint", "--public-key") == key.public_key_pem
    with pytest.raises(CommandError, match="already an active audit checkpoint key"):
        call_command("audit_checkpoint", "--create-key")
    out = run("audit_checkpoint", "--actor", "custodian lee")
    assert f"checkpoint #1 signs entry {AuditHead.objects.get().seq}" in out
    activated = AuditEntry.objects.get(action="key.activated", target_id=str(key.pk))
    assert activated.actor == "custodian lee"
    assert activated.data["purpose"] == "audit checkpoints only"


# --- API ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_auditors_read_checkpoints_from_the_api(
    checkpoint_key: SigningKey, api: Any, tmp_path: Path
) -> None:
    for _ in range(3):
        append(1)
        checkpoints.create_checkpoint("tester")
    body = api.get("/api/v1/audit/checkpoints/?after=1&limit=1").json()
    assert body["count"] == 3
    [item] = body["results"]
    stored = AuditCheckpoint.objects.get(number=2)
    assert item["number"] == 2 and item["seq"] == stored.seq and item["key"] == checkpoint_key.hint
    assert item["envelope"] == json.loads(stored.envelope)

    raw = api.get("/api/v1/audit/checkpoints/2.json")
    assert raw.status_code == 200 and raw.content.decode() == stored.envelope
    kept = tmp_path / "2.json"
    kept.write_bytes(raw.content)
    pem = str(hsm_public_pem(checkpoint_key, tmp_path))
    assert f"checkpoint file {kept} OK" in verify_audit("--checkpoint-key", pem,
                                                         "--checkpoint-file", str(kept))  # fmt: skip

    bad = api.get("/api/v1/audit/checkpoints/?after=-1")
    assert bad.status_code == 400 and "after" in bad.json()["error"]["message"]
    assert api.get("/api/v1/audit/checkpoints/9.json").status_code == 404
    schema = api.get("/api/v1/schema/").content.decode()
    assert "/api/v1/audit/checkpoints/" in schema


# --- worker and beat ----------------------------------------------------------------------


def test_the_beat_schedule_runs_the_checkpoint_task_on_the_maintenance_queue(
    settings: Any,
) -> None:
    from worker.celery import app
    from worker.tasks.audit import checkpoint_audit

    app.finalize()
    entries = [e for e in app.conf.beat_schedule.values() if e["task"] == checkpoint_audit.name]
    assert len(entries) == 1
    assert entries[0]["schedule"] == float(settings.AUDIT_CHECKPOINT_INTERVAL_SECONDS) == 3600.0
    route = app.amqp.router.route({}, checkpoint_audit.name)
    assert route["queue"].name == "maintenance"


@pytest.mark.django_db(transaction=True)
def test_the_worker_makes_a_checkpoint(
    celery_workers: Callable[[], WorkerProcess],
    checkpoint_token: SoftHSMToken,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.tasks.audit import checkpoint_audit

    monkeypatch.setenv("AUDIT_CHECKPOINT_TOKEN", settings.AUDIT_CHECKPOINT_TOKEN)
    monkeypatch.setenv("AUDIT_CHECKPOINT_PIN_FILE", str(settings.AUDIT_CHECKPOINT_PIN_FILE))
    checkpoints.create_key("tests")
    append(2)
    worker = celery_workers()
    checkpoint_audit.delay()
    deadline = time.monotonic() + 60
    while not AuditCheckpoint.objects.exists():
        assert time.monotonic() < deadline, f"no checkpoint from the worker\n{worker.output()}"
        time.sleep(0.1)
    made = AuditCheckpoint.objects.get()
    assert AuditEntry.objects.get(seq=made.seq).actor == "worker:checkpoint_audit"
    assert "1 checkpoint(s) verified" in verify_audit()


# --- local bootstrap ----------------------------------------------------------------------


@pytest.mark.django_db
def test_bootstrap_creates_the_checkpoint_key_once_on_its_own_token(
    softhsm_token: SoftHSMToken, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session's SoftHSM directory, so the in-process module needs no re-initialisation;
    # fresh token labels and PIN files, so nothing of the other tests is reused.
    settings.SOFTHSM_DIR = softhsm_token.conf_path.parent
    settings.PKCS11_PIN_FILE = tmp_path / "user.pin"
    settings.AUDIT_CHECKPOINT_PIN_FILE = tmp_path / "audit-checkpoint.pin"
    settings.AUDIT_CHECKPOINT_TOKEN = random_label("bootcp")
    names = list(current_policy().authorities)
    for name in names:
        monkeypatch.setenv(f"PKCS11_TOKEN_{name.upper()}", random_label(f"boot{name[:4]}"))
    registry.reset()
    try:
        first = run("bootstrap_local_keys")
        second = run("bootstrap_local_keys")
    finally:
        registry.reset()
    assert "audit checkpoints: created active key" in first
    assert "audit checkpoints: active key" in second and "already exists" in second
    assert "created" not in second
    key = SigningKey.objects.get(authority=CHECKPOINT_AUTHORITY)
    assert key.state == KeyState.ACTIVE
    assert key.key_ref["token"] == settings.AUDIT_CHECKPOINT_TOKEN
    assert SigningKey.objects.count() == len(names) + 1
    tokens = softhsm.list_tokens(softhsm_token.conf_path)
    assert tokens.count(settings.AUDIT_CHECKPOINT_TOKEN) == 1
    pin = settings.AUDIT_CHECKPOINT_PIN_FILE
    assert pin.stat().st_mode & 0o077 == 0
    assert pin.read_text() != settings.PKCS11_PIN_FILE.read_text()
