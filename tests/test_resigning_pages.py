"""The re-sign batch page, the approvers' dashboard and the incident page's progress."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from approvals.groups import custodian_group
from keys.models import ResignBatch, ResignDecision
from signing_service.models import Signature
from tests.fixtures_service import totp_code, totp_device
from tests.resigning_helpers import backdate, bulk_signed, revoke_and_replace

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]
PASSWORD = "pw-" + "x" * 12


def login(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.fixture
def incident_batch(active_keys: Any, make_user: Any) -> tuple[Any, ResignBatch]:
    """A compromised production key: 4 of its 6 signatures quarantined, a new key active."""
    old = backdate(active_keys["production"])
    start = timezone.now() - timedelta(hours=6)
    bulk_signed(old, 6, start=start, step=timedelta(hours=1), prefix="fraud-model")
    incident, _ = revoke_and_replace(old, start + timedelta(hours=2))
    return incident, ResignBatch.objects.get()


def test_approvers_see_the_batch_and_outsiders_see_nothing(
    incident_batch: Any, make_user: Any
) -> None:
    _, batch = incident_batch
    alice = make_user("alice")
    totp_device(alice)
    page = login(alice).get(f"/resign-batches/{batch.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    for text in (
        batch.old_key.hint,
        batch.new_key.hint,
        "the old key was revoked (compromised)",
        "fraud-model-2",
        "fraud-model-5",
        'id="batch-total">4<',
        "0 of 2",
        'name="otp_token"',
    ):
        assert text in html, text
    assert "fraud-model-1<" not in html  # before the effective time: not in the batch
    for outsider in (make_user("sam", approves=("staging",)), make_user("carol", approves=())):
        client = login(outsider)
        assert client.get(f"/resign-batches/{batch.pk}/").status_code == 404
        response = client.post(f"/resign-batches/{batch.pk}/decide", {"decision": "approve"})
        assert response.status_code == 404
        assert b"pending-resign-batches" not in client.get("/").content
    assert Client().get(f"/resign-batches/{batch.pk}/").status_code == 302  # to the login page
    assert not ResignDecision.objects.exists()


def test_two_approvers_approve_in_the_pages_and_the_batch_runs(
    incident_batch: Any, make_user: Any
) -> None:
    _, batch = incident_batch
    alice, bob = make_user("alice"), make_user("bob")
    dashboard = login(alice).get("/").content.decode()
    assert (
        'id="pending-resign-batches"' in dashboard and f"/resign-batches/{batch.pk}/" in dashboard
    )
    url = f"/resign-batches/{batch.pk}/decide"
    client = login(alice)
    assert client.get(url).status_code == 405  # POST only
    wrong = client.post(url, {"decision": "approve", "otp_token": "000000"}, follow=True)
    assert b"not valid" in wrong.content and not ResignDecision.objects.exists()
    first = client.post(
        url, {"decision": "approve", "otp_token": totp_code(totp_device(alice))}, follow=True
    )
    assert b"You approved this re-sign batch. It is now pending approval." in first.content
    assert not Signature.objects.filter(supersedes__isnull=False).exists()
    second = login(bob).post(
        url, {"decision": "approve", "otp_token": totp_code(totp_device(bob))}, follow=True
    )
    assert b"It is now" in second.content
    batch.refresh_from_db()
    assert batch.state == "completed"
    assert Signature.objects.filter(supersedes__resign_batch=batch).count() == 4
    assert 'id="pending-resign-batches"' not in login(alice).get("/").content.decode()


def test_a_decision_needs_the_csrf_token(incident_batch: Any, make_user: Any) -> None:
    _, batch = incident_batch
    alice = make_user("alice")
    client = Client(enforce_csrf_checks=True)
    client.login(username="alice", password=PASSWORD)
    response = client.post(
        f"/resign-batches/{batch.pk}/decide",
        {"decision": "approve", "otp_token": totp_code(totp_device(alice))},
    )
    assert response.status_code == 403
    assert not ResignDecision.objects.exists()


def test_the_incident_page_shows_re_sign_progress(incident_batch: Any, make_user: Any) -> None:
    incident, batch = incident_batch
    kim = make_user("kim", approves=())
    kim.groups.add(Group.objects.get_or_create(name=custodian_group("production"))[0])
    page = login(kim).get(f"/custodian/incidents/{incident.pk}/").content.decode()
    assert "pending approval (0 of 2" in page
    assert f"/resign-batches/{batch.pk}/" in page
    assert "0 of 4" in page
    from keys import resigning

    for name in ("alice", "bob"):
        resigning.decide(batch.pk, make_user(name), approve=True, otp_verified_at=timezone.now())
    page = login(kim).get(f"/custodian/incidents/{incident.pk}/").content.decode()
    assert 'class="resign-count">4 of 4' in page
    assert "completed" in page and "Resolved" in page
