"""Scheduled rotation with a frozen clock: the ceremony opens at lead time, custodians confirm,
the old key stays accepted through its transition window, then retires.

The clock is ``django.utils.timezone.now``, replaced for the test: every part of the service
reads the time through it (the job, ceremonies, signing, the trust document, the audit log).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core import mail
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from approvals.groups import custodian_group
from keys import ceremonies, registry, rotation
from keys.lifecycle import register_key
from keys.models import CeremonyState, KeyCeremony, KeyState, ResignBatch, SigningKey
from signing_service.client import gate
from signing_service.client import trust as client_trust
from signing_service.models import AuditEntry, Signature, SignatureState
from signing_service.signing import SigningRefused
from tests.fixtures_service import authed, request_body, totp_code, totp_device

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]

PASSWORD = "pw-" + "x" * 12
LEAD = timedelta(days=30)  # rotation_lead_days of deploy/local/policy.yaml
TRANSITION = timedelta(days=30)  # transition_days


class Clock:
    """A stopped clock that tests move forward by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    stopped = Clock(timezone.now().replace(microsecond=0))
    monkeypatch.setattr(timezone, "now", stopped)
    return stopped


@pytest.fixture
def staging_key(clock: Clock, hsm: Any) -> SigningKey:
    """The staging authority's only key: on the SoftHSM token, active, quarterly (91 days)."""
    backend = registry.pkcs11_backend("staging")
    generated = backend.generate(f"staging-{secrets.token_hex(4)}", "ECDSA-P256")
    return register_key(
        "staging", backend, generated, algorithm="ECDSA-P256", validity=timedelta(days=91),
        actor="tests", activate=True,
    )  # fmt: skip


@pytest.fixture
def custodians(make_user: Any) -> dict[str, Any]:
    users = {}
    for name in ("kim", "lee"):
        users[name] = make_user(name, approves=(), password=PASSWORD)
        users[name].groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
    return users


@pytest.fixture
def run_job(
    django_capture_on_commit_callbacks: Any,
) -> Callable[[], dict[str, list[dict[str, Any]]]]:
    """One run of the job at the clock's time, with its after-commit emails sent."""

    def run() -> dict[str, list[dict[str, Any]]]:
        with django_capture_on_commit_callbacks(execute=True):
            return rotation.run()

    return run


@pytest.fixture
def plan_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record each call of the real keys.resigning.plan_for_authority."""
    from keys import resigning

    calls: list[str] = []
    real = resigning.plan_for_authority

    def spy(authority: str) -> Any:
        calls.append(authority)
        return real(authority)

    monkeypatch.setattr(resigning, "plan_for_authority", spy)
    yield calls


def sign_staging(api: Any, issue_token: Any) -> tuple[dict[str, Any], bytes]:
    """Submit a staging request now; (the request as the API shows it, its bundle or b"")."""
    client = authed(api, issue_token())
    body = request_body(version=f"1.0.{secrets.randbelow(10**6)}")
    created = client.post("/api/v1/signing-requests/", body, format="json").json()
    if created["state"] != "signed":
        return created, b""
    return created, client.get(f"/api/v1/signing-requests/{created['id']}/bundle").content


def gate_verdict(api: Any, bundle_bytes: bytes, now: datetime) -> gate.Verdict:
    """The offline deployment gate with the service's signed trust document of ``now``."""
    doc = client_trust.load_verified(api.get("/api/v1/trust/").content)
    return gate.evaluate(
        doc, "development_deployment", bundle_bytes, mode="strict", now=now,
        rehash=lambda _statement: [],
    )  # fmt: skip


def audit_count(action: str, key: SigningKey) -> int:
    return AuditEntry.objects.filter(action=action, target_id=str(key.pk)).count()


def test_it_rotates_a_key_through_ceremony_transition_and_retirement(
    clock: Clock, staging_key: SigningKey, custodians: dict[str, Any], run_job: Any,
    plan_calls: list[str], api: Any, issue_token: Any, capsys: Any,
) -> None:  # fmt: skip
    old = staging_key
    assert old.not_after is not None
    _, old_bundle = sign_staging(api, issue_token)
    assert old_bundle, "the old key signs before the rotation"
    old_signature = Signature.objects.get(key=old)

    # Before the lead time: nothing.
    clock.set(old.not_after - LEAD - timedelta(minutes=1))
    assert not any(run_job().values())
    assert not KeyCeremony.objects.exists() and not mail.outbox

    # At the lead time: one ceremony, one email to both custodians, audited.
    lead_time = old.not_after - LEAD
    clock.set(lead_time)
    report = run_job()
    assert [d["target"] for d in report["rotation_due"]] == [str(old.pk)]
    ceremony = KeyCeremony.objects.get()
    assert ceremony.opened_by is None and ceremony.replaces_id == old.pk
    assert ceremony.purpose == "create" and ceremony.quorum == 2
    assert ceremony.expires_at == old.not_after and ceremony.confirmations.count() == 0
    (message,) = mail.outbox
    assert sorted(message.to) == ["kim@company.com", "lee@company.com"]
    assert old.fingerprint in message.subject and str(ceremony.pk) in message.body
    assert audit_count("key.rotation_due", old) == 1
    assert SigningKey.objects.get(pk=old.pk).rotation_due_notified_at == lead_time

    # Running again (an hour later, and twice more) opens nothing and sends nothing.
    clock.set(lead_time + timedelta(hours=1))
    assert not any(run_job().values())
    assert not any(run_job().values())
    assert KeyCeremony.objects.count() == 1 and len(mail.outbox) == 1
    assert audit_count("key.rotation_due", old) == 1

    # Two days later kim confirms on the custodian page, which shows the rotation as due.
    clock.set(lead_time + timedelta(days=2))
    kim = Client()
    kim.force_login(custodians["kim"])
    page = kim.get("/custodian/").content.decode()
    assert "Rotation due:" in page and old.fingerprint in page
    assert "confirm the rotation ceremony" in page and "opened by the rotation job" in page
    response = kim.post(
        f"/custodian/ceremonies/{ceremony.pk}/confirm",
        {"otp_token": totp_code(totp_device(custodians["kim"]))},
        follow=True,
    )
    assert b"Confirmed: 1 of 2 custodians" in response.content
    assert SigningKey.objects.filter(authority="staging").count() == 1  # nothing generated yet

    # lee confirms from the runbook command: the quorum is complete.
    activated_at = lead_time + timedelta(days=2, hours=3)
    clock.set(activated_at)
    lee_code = totp_code(totp_device(custodians["lee"]))
    call_command("key_ceremony", "confirm", str(ceremony.pk), "--user", "lee", "--otp", lee_code)
    assert "completed: new active key" in capsys.readouterr().out
    ceremony.refresh_from_db()
    new = ceremony.key
    assert ceremony.state == CeremonyState.COMPLETED and new is not None
    assert SigningKey.objects.get(pk=new.pk).state == KeyState.ACTIVE
    old.refresh_from_db()
    assert old.state == KeyState.TRANSITION and old.transitioned_at == activated_at
    witnesses = AuditEntry.objects.get(action="key.activated", target_id=str(new.pk)).data
    assert [w["custodian_identity"] for w in witnesses["custodians"]] == [
        "kim@company.com",
        "lee@company.com",
    ]
    assert witnesses["replaces"] == old.hint

    # Nothing that runs after the activation's commit ran here (as if the process died right
    # after it): the next run of the job plans re-signing the old key's signatures, once.
    assert plan_calls == []
    report = run_job()
    assert plan_calls == ["staging"] and len(report["resign_planned"]) == 1
    batch = ResignBatch.objects.get(old_key=old, new_key=new)
    assert batch.reason == "rotation" and batch.total == 1
    old_signature.refresh_from_db()
    assert old_signature.state == SignatureState.SUPERSEDED  # staging needs no approval
    assert Signature.objects.get(supersedes=old_signature).key_id == new.pk
    assert not any(run_job().values()) and plan_calls == ["staging"]

    # A day before the window ends the old key is still in transition and still accepted.
    clock.set(activated_at + TRANSITION - timedelta(days=1))
    assert not any(run_job().values())
    assert SigningKey.objects.get(pk=old.pk).state == KeyState.TRANSITION
    verdict = gate_verdict(api, old_bundle, clock.now)
    assert verdict.accepted, verdict.to_json()
    _, new_bundle = sign_staging(api, issue_token)
    assert json.loads(new_bundle)["verificationMaterial"]["publicKey"]["hint"] == new.hint

    # When it ends the job retires it, and its bundles are no longer accepted.
    clock.set(activated_at + TRANSITION)
    report = run_job()
    assert [d["target"] for d in report["retired"]] == [str(old.pk)]
    assert SigningKey.objects.get(pk=old.pk).state == KeyState.RETIRED
    assert AuditEntry.objects.get(action="key.retired", target_id=str(old.pk)).actor == (
        "rotation-job"
    )
    verdict = gate_verdict(api, old_bundle, clock.now)
    assert not verdict.accepted
    assert [c.name for c in verdict.failed] == ["key state"]
    assert "retired" in verdict.failed[0].detail
    assert gate_verdict(api, new_bundle, clock.now).accepted
    assert not any(run_job().values())


def test_a_key_expiring_with_no_successor_stops_signing_and_is_reported_once(
    clock: Clock, staging_key: SigningKey, custodians: dict[str, Any], run_job: Any,
    api: Any, issue_token: Any,
) -> None:  # fmt: skip
    key = staging_key
    assert key.not_after is not None
    clock.set(key.not_after - LEAD)
    run_job()
    ceremony = KeyCeremony.objects.get()
    mail.outbox.clear()

    # Nobody confirms. Just before expiry the key still signs.
    clock.set(key.not_after - timedelta(seconds=1))
    assert sign_staging(api, issue_token)[0]["state"] == "signed"

    clock.set(key.not_after + timedelta(minutes=5))
    assert not SigningKey.objects.get(pk=key.pk).can_sign()
    created, bundle_bytes = sign_staging(api, issue_token)
    assert created["state"] == "approved" and not bundle_bytes  # it waits, it does not fail
    assert "no active signing key" in created["waiting_reason"]

    report = run_job()
    assert [d["target"] for d in report["ceremony_expired"]] == [str(ceremony.pk)]
    assert [d["target"] for d in report["expired_without_successor"]] == [str(key.pk)]
    assert KeyCeremony.objects.get(pk=ceremony.pk).state == CeremonyState.EXPIRED
    entry = AuditEntry.objects.get(action="key.expired_without_successor", target_id=str(key.pk))
    assert entry.actor == "rotation-job" and entry.data["waiting_requests"] == 1
    (message,) = mail.outbox
    assert "expired with no successor" in message.subject
    assert sorted(message.to) == ["kim@company.com", "lee@company.com"]
    assert "1 approved request(s) are waiting" in message.body

    # Reported once: later runs neither audit nor email again, nor open a ceremony for a
    # key that already expired (custodians open one by hand).
    clock.set(key.not_after + timedelta(hours=3))
    assert not any(run_job().values())
    assert audit_count("key.expired_without_successor", key) == 1 and len(mail.outbox) == 1
    assert KeyCeremony.objects.count() == 1
    kim = Client()
    kim.force_login(custodians["kim"])
    page = kim.get("/custodian/").content.decode()
    assert "Expired with no successor:" in page and "open a key ceremony below" in page

    # A ceremony opened by hand now replaces it, and the waiting request gets signed.
    c = ceremonies.open_ceremony("staging", custodians["kim"], otp_verified_at=clock.now)
    new = ceremonies.confirm(c.pk, custodians["lee"], otp_verified_at=clock.now).key
    assert new is not None and SigningKey.objects.get(pk=key.pk).state == KeyState.TRANSITION
    from signing_service import signing

    assert signing.sign(created["id"]).state == "signed"  # what the reconciler does


def test_the_first_confirmation_of_a_system_ceremony_does_not_complete_it(
    clock: Clock, staging_key: SigningKey, custodians: dict[str, Any], run_job: Any
) -> None:
    assert staging_key.not_after is not None
    clock.set(staging_key.not_after - LEAD + timedelta(days=1))
    run_job()
    ceremony = KeyCeremony.objects.get()
    kim = custodians["kim"]
    once = ceremonies.confirm(ceremony.pk, kim, otp_verified_at=clock.now)
    assert once.state == CeremonyState.OPEN and once.key is None
    with pytest.raises(SigningRefused) as exc:
        ceremonies.confirm(ceremony.pk, kim, otp_verified_at=clock.now)
    assert exc.value.code == "already_confirmed"
    with pytest.raises(SigningRefused, match="fresh authenticator code"):
        ceremonies.confirm(
            ceremony.pk, custodians["lee"], otp_verified_at=clock.now - timedelta(minutes=6)
        )
    # A human cannot open a second create ceremony next to it.
    with pytest.raises(SigningRefused) as exc:
        ceremonies.open_ceremony("staging", custodians["lee"], otp_verified_at=clock.now)
    assert exc.value.code == "ceremony_open"
    assert SigningKey.objects.filter(authority="staging").count() == 1


def test_an_aborted_rotation_ceremony_is_not_reopened_but_stays_visible(
    clock: Clock, staging_key: SigningKey, custodians: dict[str, Any], run_job: Any
) -> None:
    assert staging_key.not_after is not None
    clock.set(staging_key.not_after - LEAD)
    run_job()
    ceremonies.abort(KeyCeremony.objects.get().pk, custodians["kim"], "we rotate next week")
    clock.set(staging_key.not_after - LEAD + timedelta(hours=1))
    assert not any(run_job().values())
    assert not KeyCeremony.objects.filter(state=CeremonyState.OPEN).exists()
    assert len(mail.outbox) == 1
    kim = Client()
    kim.force_login(custodians["kim"])
    page = kim.get("/custodian/").content.decode()
    assert "Rotation due:" in page and "no ceremony is open" in page


def test_rotation_check_dry_run_prints_what_is_due_and_changes_nothing(
    clock: Clock, staging_key: SigningKey, custodians: dict[str, Any], capsys: Any
) -> None:
    assert staging_key.not_after is not None
    call_command("rotation_check", "--dry-run")
    out = capsys.readouterr().out
    assert f"staging: active key {staging_key.fingerprint}" in out and "rotation opens" in out
    assert "due at" in out and ": nothing" in out
    at = (staging_key.not_after - LEAD + timedelta(hours=1)).isoformat()
    call_command("rotation_check", "--dry-run", "--at", at)
    out = capsys.readouterr().out
    assert "rotation_due" in out and "open a rotation ceremony" in out
    assert not KeyCeremony.objects.exists() and not mail.outbox
    assert SigningKey.objects.get(pk=staging_key.pk).rotation_due_notified_at is None
    with pytest.raises(Exception, match="--at only goes with --dry-run"):
        call_command("rotation_check", "--at", at)
    with pytest.raises(Exception, match="not an ISO 8601 time"):
        call_command("rotation_check", "--dry-run", "--at", "next tuesday")


def test_one_failing_authority_does_not_stop_the_others(
    clock: Clock, staging_key: SigningKey, run_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert staging_key.not_after is not None
    backend = registry.pkcs11_backend("production")
    prod = register_key(
        "production", backend, backend.generate(f"prod-{secrets.token_hex(4)}", "ECDSA-P256"),
        algorithm="ECDSA-P256", validity=timedelta(days=91), actor="tests", activate=True,
    )  # fmt: skip
    real = ceremonies.open_rotation_ceremony

    def broken_for_production(key: SigningKey, **kwargs: Any) -> Any:
        if key.authority == "production":
            raise RuntimeError("the production HSM is on fire")
        return real(key, **kwargs)

    monkeypatch.setattr(ceremonies, "open_rotation_ceremony", broken_for_production)
    clock.set(staging_key.not_after - LEAD)
    report = run_job()
    assert [e["authority"] for e in report["errors"]] == ["production"]
    assert "on fire" in report["errors"][0]["error"]
    assert [d["authority"] for d in report["rotation_due"]] == ["staging"]
    # The failed step rolled back whole: production is due again on the next run.
    assert SigningKey.objects.get(pk=prod.pk).rotation_due_notified_at is None
    assert audit_count("key.rotation_due", prod) == 0


def test_the_beat_schedule_runs_the_job_on_the_maintenance_queue(settings: Any) -> None:
    from worker.celery import app
    from worker.tasks import rotation as task_module

    app.finalize()
    entries = [e for e in app.conf.beat_schedule.values() if e["task"].endswith("rotate_keys")]
    assert entries == [task_module.BEAT_SCHEDULE["rotate-keys"]]
    assert entries[0]["task"] == "worker.tasks.rotation.rotate_keys"
    assert entries[0]["task"] in app.tasks
    assert entries[0]["schedule"] == float(settings.ROTATION_CHECK_SECONDS)
    route = app.amqp.router.route({}, "worker.tasks.rotation.rotate_keys")
    assert route["queue"].name == "maintenance"


def test_the_task_runs_the_job(
    clock: Clock, staging_key: SigningKey, custodians: dict[str, Any]
) -> None:
    from worker.tasks.rotation import rotate_keys

    assert staging_key.not_after is not None
    clock.set(staging_key.not_after - LEAD)
    report = rotate_keys.apply().get()
    assert [d["target"] for d in report["rotation_due"]] == [str(staging_key.pk)]
    assert KeyCeremony.objects.get().replaces_id == staging_key.pk


@pytest.mark.interop
def test_on_vault_the_rotation_ceremony_pins_a_new_transit_key_version(
    clock: Clock, custodians: dict[str, Any], run_job: Any, settings: Any, tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch, api: Any, issue_token: Any,
) -> None:  # fmt: skip
    from pathlib import Path

    from tests import vault_transit_server

    with vault_transit_server.VaultTransitServer() as vault:
        token_file = tmp_path / "vault-token"
        token_file.write_text(vault.token + "\n")
        monkeypatch.setenv("VAULT_TOKEN_FILE", str(token_file))
        settings.VAULT_ADDR = vault.url
        root = Path(__file__).resolve().parent.parent
        settings.SIGNING_POLICY_FILE = str(root / "deploy" / "policy.example.yaml")
        registry.reset()
        try:
            backend = registry.vault_backend()
            old = register_key(
                "staging", backend, backend.generate("modelsign-staging"), algorithm="ECDSA-P256",
                validity=timedelta(days=91), actor="tests", activate=True,
            )  # fmt: skip
            assert old.not_after is not None
            clock.set(old.not_after - LEAD)
            run_job()
            ceremony = KeyCeremony.objects.get()
            assert ceremony.backend == "vault" and ceremony.opened_by is None
            ceremonies.confirm(ceremony.pk, custodians["kim"], otp_verified_at=clock.now)
            new = ceremonies.confirm(ceremony.pk, custodians["lee"], otp_verified_at=clock.now).key
            assert new is not None and new.key_ref == {**old.key_ref, "version": 2}
            assert SigningKey.objects.get(pk=old.pk).state == KeyState.TRANSITION
            created, _ = sign_staging(api, issue_token)
            assert created["state"] == "signed" and created["key"]["hint"] == new.hint
        finally:
            registry.reset()
