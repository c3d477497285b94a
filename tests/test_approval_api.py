"""POST /api/v1/signing-requests/{id}/approvals/: people with a fresh TOTP, never CI tokens."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.fixtures_service import authed, totp_code, totp_device

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]


def url(req: Any) -> str:
    return f"/api/v1/signing-requests/{req.pk}/approvals/"


def test_a_ci_token_can_never_approve(pending_request: Any, issue_token: Any) -> None:
    req = pending_request()
    token = issue_token(identity="model-release-bot@company.com", authorities=("production",))
    response = authed(APIClient(), token).post(url(req), {"decision": "approve"}, format="json")
    assert response.status_code in (401, 403)
    assert not req.approvals.exists()


def test_two_people_approve_through_the_api(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    states = []
    for name in ("alice", "bob"):
        user = make_user(name)
        client = APIClient()
        client.force_login(user)
        body = {"decision": "approve", "otp_token": totp_code(totp_device(user))}
        response = client.post(url(req), body, format="json")
        assert response.status_code == 201, response.content
        states.append(response.json()["state"])
    assert states == ["pending_approval", "signed"]


def test_the_api_refuses_without_a_fresh_code(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    client = APIClient()
    client.force_login(make_user("alice"))
    response = client.post(url(req), {"decision": "approve"}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "second_factor_required"


def test_the_api_refuses_a_wrong_code(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    alice = make_user("alice")
    totp_device(alice)
    client = APIClient()
    client.force_login(alice)
    response = client.post(url(req), {"decision": "approve", "otp_token": "000000"}, format="json")
    assert response.status_code == 403
    assert not req.approvals.exists()


def test_the_api_needs_csrf_for_sessions(pending_request: Any, make_user: Any) -> None:
    req = pending_request()
    alice = make_user("alice")
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    body = {"decision": "approve", "otp_token": totp_code(totp_device(alice))}
    response = client.post(url(req), body, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]["message"]


def test_self_approval_is_refused_through_the_api(pending_request: Any, make_user: Any) -> None:
    req = pending_request(ci={"actor": "dave"})
    dave = make_user("dave")
    client = APIClient()
    client.force_login(dave)
    body = {"decision": "approve", "otp_token": totp_code(totp_device(dave))}
    response = client.post(url(req), body, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "self_approval"
    assert not req.approvals.exists()
