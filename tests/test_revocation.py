"""Revocation: revoked + quarantine + incident atomically; notifications after the commit."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from approvals.groups import custodian_group
from keys.models import Incident, KeyState, SigningKey
from keys.revocation import SIGNATURE_HEADER, revoke, sign_webhook
from signing_service.models import (
    AuditEntry,
    RequestState,
    Signature,
    SignatureState,
    SigningRequest,
)

pytestmark = [pytest.mark.softhsm]
DIGEST = hashlib.sha256(b"x").hexdigest()


def issued_signatures(key: SigningKey, n: int, start: Any, step: timedelta) -> None:
    """n signatures by ``key``, one every ``step`` from ``start`` (rows, as the service stores them)."""
    requests = SigningRequest.objects.bulk_create(
        SigningRequest(
            authority=key.authority,
            model_name=f"m{i}",
            model_version="1",
            resources=[],
            root_digest=DIGEST,
            statement_digest=DIGEST,
            policy_digest=DIGEST,
            state=RequestState.SIGNED,
            requester="ci@company.com",
            body_digest=DIGEST,
        )
        for i in range(n)
    )
    Signature.objects.store_many(
        (Signature(request=r, key=key, payload_digest=DIGEST, signed_at=start + i * step), "{}")
        for i, r in enumerate(requests)
    )


@pytest.mark.django_db
def test_exactly_the_signatures_at_or_after_the_effective_time_are_quarantined(
    active_keys: Any,
) -> None:
    key = active_keys["staging"]
    start = timezone.now() - timedelta(days=10)
    issued_signatures(key, 10_000, start, timedelta(seconds=60))
    issued_signatures(
        active_keys["production"], 10, start, timedelta(seconds=60)
    )  # other keys untouched
    effective = start + 5_000 * timedelta(seconds=60)  # exactly the 5,001st signature
    incident = revoke(key.pk, reason="compromised", effective_at=effective, actor="ir@company.com")
    assert incident.quarantined == 5_000
    quarantined = Signature.objects.filter(state=SignatureState.QUARANTINED)
    assert quarantined.count() == 5_000
    assert not quarantined.filter(signed_at__lt=effective).exists()
    assert not Signature.objects.filter(
        key=key, signed_at__gte=effective, state=SignatureState.VALID
    ).exists()
    assert (
        Signature.objects.filter(key=active_keys["production"], state=SignatureState.VALID).count()
        == 10
    )
    key.refresh_from_db()
    assert key.state == KeyState.REVOKED and key.revocation_effective_at == effective
    entry = AuditEntry.objects.get(action="incident.opened")
    assert entry.data["quarantined"] == 5_000
    call_command("verify_audit")


@pytest.mark.django_db
def test_a_failed_revocation_changes_nothing(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = active_keys["staging"]
    issued_signatures(key, 5, timezone.now() - timedelta(hours=1), timedelta(minutes=1))
    import keys.revocation as revocation

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("incident store down")

    monkeypatch.setattr(revocation.Incident.objects, "create", broken)
    with pytest.raises(RuntimeError):
        revoke(key.pk, reason="compromised", effective_at=None, actor="ir")
    assert SigningKey.objects.get(pk=key.pk).state == KeyState.ACTIVE
    assert not Signature.objects.filter(state=SignatureState.QUARANTINED).exists()


class Hook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook(settings: Any) -> Iterator[list[tuple[dict[str, str], bytes]]]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received = []
    settings.INCIDENT_WEBHOOK_URL = f"http://127.0.0.1:{server.server_port}/hook"
    settings.INCIDENT_WEBHOOK_SECRET = "s3cret-for-tests"
    yield Hook.received
    server.shutdown()


@pytest.mark.django_db(transaction=True)
def test_notifications_go_out_after_the_commit(
    active_keys: Any, webhook: Any, make_user: Any
) -> None:
    kim = make_user("kim", approves=())
    kim.groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
    make_user("alice")  # an approver, not a custodian: not emailed
    mail.outbox.clear()
    incident = revoke(
        active_keys["staging"].pk, reason="compromised", effective_at=None, actor="ir"
    )
    ((headers, body),) = webhook
    assert headers[SIGNATURE_HEADER] == sign_webhook(body, "s3cret-for-tests")
    message = json.loads(body)
    assert message["event"] == "key.revoked" and message["incident"] == str(incident.pk)
    assert [m.to for m in mail.outbox] == [["kim@company.com"]]
    notes = Incident.objects.get(pk=incident.pk).notifications
    assert {(n["channel"], n["ok"]) for n in notes} == {("webhook", True), ("email", True)}


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_webhook_is_recorded_and_the_revocation_stands(
    active_keys: Any, settings: Any
) -> None:
    settings.INCIDENT_WEBHOOK_URL = "http://127.0.0.1:9/hook"
    incident = revoke(
        active_keys["staging"].pk, reason="compromised", effective_at=None, actor="ir"
    )
    (note,) = Incident.objects.get(pk=incident.pk).notifications
    assert note["channel"] == "webhook" and note["ok"] is False
    assert SigningKey.objects.get(pk=active_keys["staging"].pk).state == KeyState.REVOKED


@pytest.mark.django_db
def test_the_runbook_command(active_keys: Any, capsys: Any) -> None:
    key = active_keys["staging"]
    issued_signatures(key, 4, timezone.now() - timedelta(hours=4), timedelta(hours=1))
    with pytest.raises(CommandError, match="in the future"):
        call_command(
            "revoke_key",
            key.hint[:8],
            "--reason",
            "compromised",
            "--effective-at",
            "2999-01-01T00:00:00Z",
        )
    with pytest.raises(CommandError, match="needs a time zone"):
        call_command(
            "revoke_key",
            key.hint[:8],
            "--reason",
            "compromised",
            "--effective-at",
            "2026-01-01T00:00:00",
        )
    when = (timezone.now() - timedelta(hours=2, minutes=30)).isoformat()
    call_command("revoke_key", key.hint[:8], "--reason", "compromised", "--effective-at", when)
    assert "2 signatures quarantined" in capsys.readouterr().out
    with pytest.raises(CommandError, match="a revoked key cannot become revoked"):
        call_command("revoke_key", key.hint[:8], "--reason", "compromised")


@pytest.mark.django_db(transaction=True)
def test_quarantined_bundles_are_rejected_by_the_offline_verifier(
    live_server: Any, api: Any, issue_token: Any, active_keys: Any, tmp_path: Path
) -> None:
    from tests.fixtures_service import authed, request_body, write_model
    from tests.test_trust_verify import fetch, verify

    client = authed(api, issue_token())
    sigs = {}
    for name in ("before", "after"):
        model = write_model(tmp_path / name, {"w.bin": name.encode()})
        rid = client.post("/api/v1/signing-requests/", request_body(model), format="json").json()[
            "id"
        ]
        sig = tmp_path / f"{name}.sig"
        sig.write_bytes(client.get(f"/api/v1/signing-requests/{rid}/bundle").content)
        sigs[name] = (model, sig)
        if name == "before":
            effective = timezone.now()
    revoke(active_keys["staging"].pk, reason="compromised", effective_at=effective, actor="ir")
    assert Signature.objects.get(state=SignatureState.QUARANTINED).request.model_name == "after"
    pin = tmp_path / "prod.pem"
    pin.write_text(active_keys["production"].public_key_pem)
    trust = tmp_path / "trust.json"
    assert fetch(live_server.url, trust, "--pin-key", str(pin)) == 0
    assert verify(*sigs["before"], trust) == 0
    assert verify(*sigs["after"], trust) == 1
