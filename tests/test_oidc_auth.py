"""CI jobs authenticate with their OIDC ID token (SPEC 7): what is accepted, what is refused.

A local issuer on loopback (tests/oidc_issuer.py) serves discovery and JWKS with real RSA
and EC keys; tokens are signed with them. Redis is a real redis-server; signing uses the
SoftHSM test token.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest
from django.utils import timezone

from approvals.services import decide
from signing_service import oidc
from signing_service.models import AuditEntry, Signature, SigningRequest
from signing_service.signing import SigningRefused
from tests.fixtures_service import authed, request_body
from tests.oidc_issuer import AUDIENCE, IssuerKeys, OidcService, b64json, b64url
from tests.redis_fixtures import free_port

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]

URL = "/api/v1/signing-requests/"


@pytest.fixture
def service(oidc_service: OidcService, active_keys: Any) -> OidcService:
    return oidc_service


def post(api: Any, token: str, body: dict[str, Any] | None = None, key: str = "") -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return api.post(URL, body or request_body(), format="json", **headers)


def refused(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code, error
    assert SigningRequest.objects.count() == 0
    return str(error["message"])


# --- accepted --------------------------------------------------------------------------


def test_a_github_token_signs_for_staging(api: Any, service: OidcService) -> None:
    body = request_body(ci={"actor": "mallory", "repository": "somewhere/else"})
    response = post(api, service.github_token(), body)
    assert response.status_code == 201, response.content
    req = SigningRequest.objects.get()
    assert req.state == "signed"
    assert req.requester == "repo:acme/models:environment:staging"
    assert req.api_token is None
    # The verified token wins over what the job says about itself.
    assert req.actor == "dave"
    assert req.ci["actor"] == "dave" and req.ci["repository"] == "acme/models"
    assert req.ci["commit"] == "a" * 40 and req.ci["ref"] == "refs/heads/main"
    assert Signature.objects.filter(request=req).count() == 1
    entry = AuditEntry.objects.get(action="signing_request.created")
    assert entry.data["oidc"]["issuer"] == service.github.url
    assert entry.data["oidc"]["subject"] == "repo:acme/models:environment:staging"


def test_a_gitlab_token_signs_for_staging_with_es256(api: Any, service: OidcService) -> None:
    response = post(api, service.gitlab_token())
    assert response.status_code == 201, response.content
    req = SigningRequest.objects.get()
    assert req.state == "signed"
    assert req.requester == "project_path:ml/models:ref_type:branch:ref:main"
    assert req.actor == "erin"
    assert req.ci["repository"] == "ml/models"


def test_the_token_reads_back_its_own_request_only(
    api: Any, service: OidcService, issue_token: Any
) -> None:
    token = service.github_token()
    created = post(api, token).json()
    other = authed(api, issue_token(authorities=("staging",))).post(
        URL, request_body(version="2"), format="json"
    )
    assert other.status_code == 201
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    # Reads do not spend the token: the client polls and fetches the bundle with it.
    assert api.get(f"{URL}{created['id']}/").status_code == 200
    assert api.get(f"{URL}{created['id']}/bundle").status_code == 200
    assert api.get(f"{URL}{other.json()['id']}/").status_code == 404


def test_an_api_token_still_works_where_oidc_is_not_required(
    api: Any, service: OidcService, issue_token: Any
) -> None:
    response = authed(api, issue_token(authorities=("staging",))).post(
        URL, request_body(), format="json"
    )
    assert response.status_code == 201, response.content


# --- single use ------------------------------------------------------------------------


def test_the_same_token_twice_is_a_replay(api: Any, service: OidcService) -> None:
    token = service.github_token()
    assert post(api, token, key="first").status_code == 201
    response = post(api, token, request_body(version="2"), key="second")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "oidc_replayed"
    assert SigningRequest.objects.count() == 1


def test_a_replay_without_idempotency_key_is_refused(api: Any, service: OidcService) -> None:
    token = service.github_token()
    assert post(api, token).status_code == 201
    response = post(api, token)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "oidc_replayed"
    assert SigningRequest.objects.count() == 1


def test_a_retry_of_the_very_same_request_gets_the_first_answer(
    api: Any, service: OidcService
) -> None:
    token, body = service.github_token(), request_body()
    first = post(api, token, body, key="retry-1")
    again = post(api, token, body, key="retry-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    # Same Idempotency-Key, another body: a replay, not a retry.
    other = post(api, token, request_body(version="9"), key="retry-1")
    assert other.status_code == 401
    assert SigningRequest.objects.count() == 1


def test_redis_down_refuses_rather_than_risk_a_replay(
    api: Any, service: OidcService, settings: Any
) -> None:
    settings.OIDC_REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    message = refused(post(api, service.github_token()), 503, "oidc_replay_check_unavailable")
    assert "replay" in message


# --- the token itself ------------------------------------------------------------------


@pytest.mark.parametrize("aud", ["https://other.test", [AUDIENCE, "https://other.test"], None])
def test_a_wrong_audience_is_refused(api: Any, service: OidcService, aud: Any) -> None:
    token = service.github.token(service.github_claims(aud=aud))
    refused(post(api, token), 401, "oidc_wrong_audience")


def test_a_single_audience_list_is_accepted(api: Any, service: OidcService) -> None:
    token = service.github.token(service.github_claims(aud=[AUDIENCE]))
    assert post(api, token).status_code == 201


def test_an_unknown_issuer_is_refused(api: Any, service: OidcService) -> None:
    stranger = service.issuers.add("stranger")
    token = stranger.token(service.github_claims(iss=stranger.url))
    message = refused(post(api, token), 401, "oidc_unknown_issuer")
    assert stranger.url in message
    assert service.issuers.hits["/stranger/.well-known/openid-configuration"] == 0


def test_an_issuer_whose_jwks_is_on_another_origin_is_refused(
    api: Any, service: OidcService
) -> None:
    port = service.issuers.base.rsplit(":", 1)[1]
    # Served by the same test server, so only the origin check can refuse it.
    service.github.jwks_uri = f"http://localhost:{port}/github/.well-known/jwks"
    message = refused(post(api, service.github_token()), 401, "oidc_jwks_refused")
    assert "not on the issuer's origin" in message
    assert service.issuers.hits["/github/.well-known/jwks"] == 0


def test_a_discovery_document_for_another_issuer_is_refused(api: Any, service: OidcService) -> None:
    service.github.discovery_issuer = "https://token.actions.githubusercontent.com"
    refused(post(api, service.github_token()), 401, "oidc_jwks_refused")


def test_alg_none_is_refused(api: Any, service: OidcService) -> None:
    token = service.github.unsigned_token(service.github_claims())
    message = refused(post(api, token), 401, "oidc_algorithm_refused")
    assert "'none'" in message


def test_hs256_signed_with_the_rsa_public_key_is_refused(api: Any, service: OidcService) -> None:
    token = service.github.hs256_with_public_key(service.github_claims())
    refused(post(api, token), 401, "oidc_algorithm_refused")


def test_an_rs256_header_over_an_ec_key_is_refused(api: Any, service: OidcService) -> None:
    keys = service.github.keys
    token = service.github.token(service.github_claims(), alg="RS256", kid=keys.ec_kid)
    message = refused(post(api, token), 401, "oidc_algorithm_refused")
    assert "needs a RSA key" in message


def test_an_es256_header_over_an_rsa_key_is_refused(api: Any, service: OidcService) -> None:
    keys = service.gitlab.keys
    token = service.gitlab.token(service.gitlab_claims(), alg="ES256", kid=keys.rsa_kid)
    refused(post(api, token), 401, "oidc_algorithm_refused")


@pytest.mark.parametrize(
    "header",
    [
        {"jku": "https://evil.test/jwks"},
        {"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}},
        {"x5u": "https://evil.test/cert.pem"},
        {"x5c": ["MIIB"]},
        {"crit": ["exp"]},
    ],
    ids=["jku", "jwk", "x5u", "x5c", "crit"],
)
def test_headers_that_choose_a_key_are_refused(
    api: Any, service: OidcService, header: dict[str, Any]
) -> None:
    token = service.github.token(service.github_claims(), headers=header)
    message = refused(post(api, token), 401, "oidc_header_refused")
    assert repr(next(iter(header))) in message


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (
            lambda i, c: f"{b64json({'alg': ['RS256'], 'kid': 'k'})}.{b64json(c)}.c2ln",
            "oidc_algorithm_refused",
        ),
        (lambda i, c: f"{b64url(b'not json')}.{b64json(c)}.c2ln", "oidc_malformed"),
        (
            lambda i, c: f"{b64json({'alg': 'RS256', 'kid': 'k'})}.{b64json([c])}.c2ln",
            "oidc_malformed",
        ),
        (
            lambda i, c: f"{b64json({'alg': 'RS256', 'kid': ['k']})}.{b64json(c)}.c2ln",
            "oidc_header_refused",
        ),
        (lambda i, c: i.token({**c, "exp": float("nan")}), "oidc_claim_missing"),
    ],
    ids=["alg-list", "header-not-json", "payload-array", "kid-list", "exp-nan"],
)
def test_malformed_tokens_get_401_not_500(
    api: Any, service: OidcService, make: Any, code: str
) -> None:
    token = make(service.github, service.github_claims())
    refused(post(api, token), 401, code)


def test_a_signature_by_another_key_is_refused(api: Any, service: OidcService) -> None:
    impostor = IssuerKeys(rsa_kid=service.github.keys.rsa_kid)
    service.github.keys, real = impostor, service.github.keys
    token = service.github_token()
    service.github.keys = real
    refused(post(api, token), 401, "oidc_bad_signature")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # signing it
def test_a_short_rsa_key_is_refused(api: Any, service: OidcService) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    service.github.keys = IssuerKeys(rsa=weak)
    message = refused(post(api, service.github_token()), 401, "oidc_algorithm_refused")
    assert "1024 bits" in message


def test_an_unknown_kid_is_refused(api: Any, service: OidcService) -> None:
    token = service.github.token(service.github_claims(), kid="not-there")
    message = refused(post(api, token), 401, "oidc_unknown_key")
    assert "'not-there'" in message


def test_a_jwt_is_refused_when_oidc_is_not_configured(
    api: Any, service: OidcService, settings: Any
) -> None:
    settings.OIDC_CONFIG_FILE = ""
    refused(post(api, service.github_token()), 401, "oidc_not_configured")


# --- times -----------------------------------------------------------------------------


def test_an_expired_token_is_refused(api: Any, service: OidcService) -> None:
    now = int(time.time())
    token = service.github_token(iat=now - 600, nbf=now - 600, exp=now - 120)
    refused(post(api, token), 401, "oidc_expired")


def test_expiry_has_at_most_sixty_seconds_of_leeway(api: Any, service: OidcService) -> None:
    now = int(time.time())
    within = service.github_token(iat=now - 300, nbf=now - 300, exp=now - 20)
    assert post(api, within).status_code == 201
    beyond = service.github_token(iat=now - 300, nbf=now - 300, exp=now - 90)
    response = post(api, beyond, request_body(version="2"))
    assert response.json()["error"]["code"] == "oidc_expired"


def test_a_token_not_yet_valid_is_refused(api: Any, service: OidcService) -> None:
    now = int(time.time())
    refused(post(api, service.github_token(nbf=now + 120)), 401, "oidc_not_yet_valid")


def test_a_token_issued_in_the_future_is_refused(api: Any, service: OidcService) -> None:
    now = int(time.time())
    token = service.github_token(iat=now + 120, nbf=None, exp=now + 400)
    refused(post(api, token), 401, "oidc_issued_in_future")


def test_a_token_living_too_long_is_refused(api: Any, service: OidcService) -> None:
    now = int(time.time())
    token = service.github_token(iat=now, exp=now + 3600)
    message = refused(post(api, token), 401, "oidc_lifetime_too_long")
    assert "at most 900 s" in message


@pytest.mark.parametrize("claim", ["jti", "exp", "iat"])
def test_a_token_without_a_required_claim_is_refused(
    api: Any, service: OidcService, claim: str
) -> None:
    token = service.github_token(**{claim: None})
    refused(post(api, token), 401, "oidc_claim_missing")


# --- the issuer's rules ----------------------------------------------------------------


def test_a_fork_is_refused(api: Any, service: OidcService) -> None:
    token = service.github_token(
        repository="mallory/models", repository_owner="mallory", repository_owner_id="6666",
        sub="repo:mallory/models:environment:staging",
    )  # fmt: skip
    message = refused(post(api, token), 403, "oidc_owner_not_pinned")
    assert "'6666'" in message and "fork" in message


@pytest.mark.parametrize("event", ["pull_request", "pull_request_target"])
def test_a_github_pull_request_run_is_refused(api: Any, service: OidcService, event: str) -> None:
    token = service.github_token(event_name=event, ref="refs/pull/7/merge")
    message = refused(post(api, token), 403, "oidc_pull_request_refused")
    assert event in message


def test_a_gitlab_merge_request_pipeline_is_refused(api: Any, service: OidcService) -> None:
    token = service.gitlab_token(pipeline_source="merge_request_event")
    refused(post(api, token), 403, "oidc_pull_request_refused")


def test_a_repository_outside_allowed_repositories_is_refused(
    api: Any, service: OidcService
) -> None:
    token = service.github_token(repository="acme-old/models")
    message = refused(post(api, token), 403, "oidc_repository_not_allowed")
    assert "'acme-old/models'" in message


def test_a_required_claim_must_match(api: Any, service: OidcService) -> None:
    token = service.gitlab_token(ref_protected="false")
    message = refused(post(api, token), 403, "oidc_claim_not_allowed")
    assert "ref_protected='false'" in message


def test_an_identity_outside_authorized_signers_is_refused(api: Any, service: OidcService) -> None:
    token = service.github_token(repository="acme/other", environment="production")
    message = refused(post(api, token, request_body(environment="production")), 403,
                      "signer_not_authorized")  # fmt: skip
    assert "'repo:acme/other:environment:production'" in message


def test_an_identity_for_another_environment_is_refused(api: Any, service: OidcService) -> None:
    # A job in the staging environment cannot sign for production.
    token = service.github_token()
    body = request_body(environment="production")
    refused(post(api, token, body), 403, "signer_not_authorized")


def test_a_claim_cannot_imitate_the_identity_template(api: Any, service: OidcService) -> None:
    token = service.github_token(environment="x:environment:staging")
    refused(post(api, token), 403, "oidc_identity_claim_invalid")


def test_a_claim_the_identity_needs_must_be_there(api: Any, service: OidcService) -> None:
    message = refused(post(api, service.github_token(environment=None)), 403,
                      "oidc_identity_claim_missing")  # fmt: skip
    assert "'environment'" in message


def test_an_api_token_is_refused_where_oidc_is_required(
    api: Any, service: OidcService, issue_token: Any
) -> None:
    token = issue_token(authorities=("production",))
    response = authed(api, token).post(URL, request_body(environment="production"), format="json")
    message = refused(response, 403, "oidc_required")
    assert "'production' accepts only CI OIDC ID tokens" in message


# --- actor and approvals ---------------------------------------------------------------


def test_the_actor_who_triggered_the_job_cannot_approve_it(
    api: Any, service: OidcService, make_user: Any
) -> None:
    token = service.github_token(environment="production", actor="dave")
    response = post(api, token, request_body(environment="production"))
    assert response.status_code == 201, response.content
    req = SigningRequest.objects.get()
    assert (req.state, req.actor) == ("pending_approval", "dave")
    with pytest.raises(SigningRefused) as exc:
        decide(req.pk, make_user("dave"), "approve", otp_verified_at=timezone.now())
    assert exc.value.code == "self_approval"
    outcome = decide(req.pk, make_user("alice"), "approve", otp_verified_at=timezone.now())
    assert outcome.approvals_received == 1


# --- keys: cached, refreshed once on an unknown kid ------------------------------------


def test_issuer_keys_are_cached_and_refreshed_once_for_a_new_kid(
    api: Any, service: OidcService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(oidc, "_clock", lambda: clock[0])
    hits = service.issuers.hits
    jwks = "/github/.well-known/jwks"
    for version in ("1", "2"):
        assert post(api, service.github_token(), request_body(version=version)).status_code == 201
    assert hits[jwks] == 1

    service.github.keys = IssuerKeys()  # the issuer rotates its keys
    rotated = post(api, service.github_token(), request_body(version="3"))
    assert rotated.json()["error"]["code"] == "oidc_unknown_key"
    assert hits[jwks] == 1  # fetched a moment ago: not again yet (rate limited)

    clock[0] += 61
    assert post(api, service.github_token(), request_body(version="4")).status_code == 201
    assert hits[jwks] == 2
    bogus = service.github.token(service.github_claims(), kid=f"k-{uuid.uuid4()}")
    assert post(api, bogus, request_body(version="5")).status_code == 401
    assert hits[jwks] == 2


def test_an_unreachable_issuer_is_a_503_retried_at_most_once_a_minute(
    api: Any, service: OidcService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [5000.0]
    monkeypatch.setattr(oidc, "_clock", lambda: clock[0])
    discovery = "/github/.well-known/openid-configuration"
    github = service.issuers.issuers.pop("github")  # the issuer answers 404 now
    for _ in range(2):
        message = refused(post(api, service.github_token()), 503, "oidc_jwks_unavailable")
        assert "HTTP 404" in message
    assert service.issuers.hits[discovery] == 1

    service.issuers.issuers["github"] = github
    clock[0] += 61
    assert post(api, service.github_token()).status_code == 201
    assert service.issuers.hits[discovery] == 2


# --- refusals are logged, tokens are not -----------------------------------------------


def test_refusals_are_logged_with_the_reason_and_without_the_token(
    api: Any, service: OidcService, caplog: pytest.LogCaptureFixture
) -> None:
    token = service.github.token(service.github_claims(aud="https://other.test"))
    with caplog.at_level(logging.WARNING, logger="signing_service.oidc"):
        post(api, token)
    assert "oidc_wrong_audience" in caplog.text
    assert token not in caplog.text
    assert token.split(".")[2] not in str(post(api, token).content)
