"""Custodian pages: scoped to custodians; a ceremony run in the browser makes the signing key."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from approvals.groups import custodian_group
from keys.models import CeremonyState, KeyCeremony, KeyState, SigningKey
from tests.fixtures_service import authed, request_body, totp_code, totp_device

PASSWORD = "pw-" + "x" * 12


def make_custodian(make_user: Any, name: str, authority: str = "staging") -> Any:
    user = make_user(name, approves=(), password=PASSWORD)
    user.groups.add(Group.objects.get_or_create(name=custodian_group(authority))[0])
    return user


@pytest.mark.django_db
def test_non_custodians_see_no_keys_or_audit(make_user: Any) -> None:
    client = Client()
    client.force_login(make_user("alice"))
    assert client.get("/custodian/").status_code == 404
    assert client.get("/custodian/audit/").status_code == 404
    assert b"/custodian/" not in client.get("/").content  # no Keys link either


@pytest.mark.softhsm
@pytest.mark.django_db
def test_custodians_see_their_authorities_keys_only(make_user: Any, active_keys: Any) -> None:
    client = Client()
    client.force_login(make_custodian(make_user, "kim"))
    page = client.get("/custodian/").content.decode()
    assert active_keys["staging"].fingerprint in page
    assert active_keys["production"].fingerprint not in page
    assert "days left" in page
    audit = client.get("/custodian/audit/?action=key.").content.decode()
    assert "key.activated" in audit and "signing_request" not in audit


@pytest.mark.softhsm
@pytest.mark.django_db
def test_two_custodians_run_a_ceremony_in_the_pages(
    make_user: Any, active_keys: Any, api: Any, issue_token: Any
) -> None:
    kim, lee = make_custodian(make_user, "kim"), make_custodian(make_user, "lee")
    outsider = make_custodian(make_user, "pat", authority="production")
    clients = {}
    for user in (kim, lee, outsider):
        clients[user.username] = Client()
        clients[user.username].force_login(user)
    kim_code = totp_code(totp_device(kim))
    response = clients["kim"].post(
        "/custodian/ceremonies/open", {"authority": "staging", "otp_token": kim_code}, follow=True
    )
    assert b"1 of 2 custodians" in response.content
    ceremony = KeyCeremony.objects.get()
    assert clients["pat"].post(f"/custodian/ceremonies/{ceremony.pk}/confirm").status_code == 404
    lee_code = totp_code(totp_device(lee))
    response = clients["lee"].post(
        f"/custodian/ceremonies/{ceremony.pk}/confirm", {"otp_token": lee_code}, follow=True
    )
    assert b"Ceremony complete" in response.content
    ceremony.refresh_from_db()
    assert ceremony.state == CeremonyState.COMPLETED
    assert SigningKey.objects.get(pk=active_keys["staging"].pk).state == KeyState.TRANSITION
    body = (
        authed(api, issue_token())
        .post("/api/v1/signing-requests/", request_body(), format="json")
        .json()
    )
    assert body["key"]["hint"] == ceremony.key.hint


@pytest.mark.softhsm
@pytest.mark.django_db
def test_custodians_destroy_a_retired_key_in_the_pages(make_user: Any, active_keys: Any) -> None:
    from keys.lifecycle import transition

    old = active_keys["staging"]
    transition(old.pk, KeyState.TRANSITION, actor="t")
    transition(old.pk, KeyState.RETIRED, actor="t")
    kim, lee = make_custodian(make_user, "kim"), make_custodian(make_user, "lee")
    clients = {u.username: Client() for u in (kim, lee)}
    for user in (kim, lee):
        clients[user.username].force_login(user)
    page = clients["kim"].get("/custodian/").content.decode()
    assert "Destroy (ceremony)" in page
    form = {
        "authority": "staging",
        "purpose": "destroy",
        "key": old.pk,
        "otp_token": totp_code(totp_device(kim)),
    }
    assert (
        b"Ceremony to destroy"
        in clients["kim"].post("/custodian/ceremonies/open", form, follow=True).content
    )
    ceremony = KeyCeremony.objects.get()
    lee_code = totp_code(totp_device(lee))
    done = clients["lee"].post(
        f"/custodian/ceremonies/{ceremony.pk}/confirm", {"otp_token": lee_code}, follow=True
    )
    assert b"destroyed on the backend" in done.content
    assert SigningKey.objects.get(pk=old.pk).destroyed_at is not None


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_custodian_revokes_from_the_page_and_sees_the_incident(
    make_user: Any, active_keys: Any, api: Any, issue_token: Any
) -> None:
    from signing_service.models import Signature

    token = issue_token()
    for version in ("1", "2"):
        authed(api, token).post(
            "/api/v1/signing-requests/", request_body(version=version), format="json"
        )
    kim = make_custodian(make_user, "kim")
    client = Client()
    client.force_login(kim)
    key = active_keys["staging"]
    assert b"Revoke now" in client.get("/custodian/").content
    refused = client.post(
        f"/custodian/keys/{key.pk}/revoke", {"reason": "compromised"}, follow=True
    )
    assert b"fresh authenticator code" in refused.content
    assert SigningKey.objects.get(pk=key.pk).state == KeyState.ACTIVE
    first = Signature.objects.order_by("signed_at").first()
    form = {"reason": "compromised", "effective_at": first.signed_at.strftime("%Y-%m-%dT%H:%M:%S.%f"),
            "otp_token": totp_code(totp_device(kim))}  # fmt: skip
    page = client.post(f"/custodian/keys/{key.pk}/revoke", form, follow=True).content.decode()
    assert "2 signatures quarantined" in page
    assert "demo-model" in page and "quarantined" in page
    assert SigningKey.objects.get(pk=key.pk).state == KeyState.REVOKED
    outsider = Client()
    outsider.force_login(make_custodian(make_user, "pat", authority="production"))
    from keys.models import Incident

    incident = Incident.objects.get()
    assert outsider.get(f"/custodian/incidents/{incident.pk}/").status_code == 404
