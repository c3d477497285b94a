"""Who may sign for which authority, and who may see which request."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from signing_service.models import ApiToken, SigningRequest
from tests.fixtures_service import authed, request_body

URL = "/api/v1/signing-requests/"


@pytest.mark.django_db
def test_it_needs_a_token(api: Any) -> None:
    response = api.post(URL, request_body(), format="json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["Bearer mst_unknown_token", "Token abc", "Bearer "])
def test_it_refuses_unknown_or_malformed_tokens(api: Any, header: str) -> None:
    api.credentials(HTTP_AUTHORIZATION=header)
    response = api.post(URL, request_body(), format="json")
    assert response.status_code == 401
    assert SigningRequest.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_an_expired_token(api: Any, issue_token: Any) -> None:
    token = issue_token(expires_in=timedelta(seconds=-1))
    response = authed(api, token).post(URL, request_body(), format="json")
    assert response.status_code == 401
    assert "unknown, revoked or expired" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_it_refuses_a_revoked_token(api: Any, issue_token: Any) -> None:
    token = issue_token()
    ApiToken.objects.update(revoked_at=timezone.now())
    response = authed(api, token).post(URL, request_body(), format="json")
    assert response.status_code == 401


@pytest.mark.django_db
def test_a_staging_token_cannot_sign_for_production(api: Any, issue_token: Any) -> None:
    token = issue_token(authorities=("staging",))
    response = authed(api, token).post(URL, request_body(environment="production"), format="json")
    assert response.status_code == 403
    assert (
        "may not sign for 'production' (scoped to: staging)" in response.json()["error"]["message"]
    )
    assert SigningRequest.objects.count() == 0


@pytest.mark.django_db
def test_an_identity_outside_authorized_signers_gets_403(api: Any, issue_token: Any) -> None:
    # The token is in scope, but the identity does not match staging's authorized_signers.
    token = issue_token(identity="intern@company.com", authorities=("staging",))
    response = authed(api, token).post(URL, request_body(), format="json")
    assert response.status_code == 403
    message = response.json()["error"]["message"]
    assert "'intern@company.com' is not an authorized signer for 'staging'" in message
    assert SigningRequest.objects.count() == 0


@pytest.mark.django_db
def test_glob_signers_match_whole_identity_case_sensitively(api: Any, issue_token: Any) -> None:
    from signing_service.policy import current_policy

    staging = current_policy().authority("staging")
    assert staging is not None
    assert staging.allows_signer("ml-engineer-ada@company.com")
    assert not staging.allows_signer("ML-ENGINEER-ada@company.com")
    assert not staging.allows_signer("ml-engineer-ada@company.com.evil.org")


@pytest.mark.django_db
def test_another_identity_cannot_read_a_request(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    owner = issue_token()
    created = authed(api, owner).post(URL, request_body(), format="json").json()
    other = issue_token(identity="model-release-bot@company.com", authorities=("production",))
    for path in (f"{URL}{created['id']}/", f"{URL}{created['id']}/bundle"):
        assert authed(api, other).get(path).status_code == 404
        assert authed(api, owner).get(path).status_code == 200
