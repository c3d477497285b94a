"""The approver pages: scoping, decisions through the UI, CSRF, query counts."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from signing_service.models import RequestState, SigningRequest
from tests.fixtures_service import totp_code, totp_device

pytestmark = pytest.mark.django_db
PASSWORD = "pw-" + "x" * 12


def login(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def make_pending(n: int, authority: str = "production") -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    SigningRequest.objects.bulk_create(
        SigningRequest(
            authority=authority,
            model_name=f"model-{i}",
            model_version="1",
            state=RequestState.PENDING_APPROVAL,
            resources=[{"name": "w.bin", "algorithm": "sha256", "digest": digest}] * 1,
            root_digest=digest,
            statement_digest=digest,
            policy_digest=digest,
            required_approvals=2,
            requester="ci@company.com",
            body_digest=digest,
            created_at=timezone.now(),
        )
        for i in range(n)
    )


def test_the_dashboard_query_count_does_not_grow(make_user: Any) -> None:
    client = login(make_user("alice"))
    counts = []
    for n in (10, 500):
        SigningRequest.objects.all().delete()
        make_pending(n)
        with CaptureQueriesContext(connection) as ctx:
            response = client.get("/")
        assert response.status_code == 200
        assert response.content.count(b"model-") >= min(n, 25)
        counts.append(len(ctx.captured_queries))
    assert 0 < counts[0] == counts[1], counts


def test_a_dashboard_page_is_read_in_index_order_without_sorting_the_listing(
    make_user: Any,
) -> None:
    # All pending at the same instant: only the id orders them, as in a burst of CI jobs.
    make_pending(300)
    client = login(make_user("alice"))
    with CaptureQueriesContext(connection) as ctx:
        assert client.get("/").status_code == 200
    (listing,) = [
        q["sql"]
        for q in ctx.captured_queries
        if q["sql"].startswith('SELECT "signing_service_signingrequest"."id"')
        and "LIMIT 25" in q["sql"]
    ]
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN QUERY PLAN " + listing)
        plan = " / ".join(str(row[-1]) for row in cursor.fetchall())
    assert "req_auth_state_created" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # a sort would read every pending row first


def test_a_user_in_no_approver_group_sees_nothing(make_user: Any) -> None:
    make_pending(3)
    req = SigningRequest.objects.first()
    client = login(make_user("carol", approves=()))
    page = client.get("/")
    assert b"model-" not in page.content
    assert b"not an approver" in page.content
    assert client.get(f"/requests/{req.pk}/").status_code == 404
    assert client.post(f"/requests/{req.pk}/decide", {"decision": "approve"}).status_code == 404


def test_an_approver_for_staging_cannot_see_production(make_user: Any) -> None:
    make_pending(1)
    client = login(make_user("sam", approves=("staging",)))
    assert b"model-0" not in client.get("/").content
    assert client.get(f"/requests/{SigningRequest.objects.get().pk}/").status_code == 404


def test_pages_need_login() -> None:
    response = Client().get("/")
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_decisions_are_post_only_and_csrf_protected(make_user: Any) -> None:
    make_pending(1)
    req = SigningRequest.objects.get()
    alice = make_user("alice")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get(f"/requests/{req.pk}/decide").status_code == 405
    assert client.post(f"/requests/{req.pk}/decide", {"decision": "approve"}).status_code == 403
    assert not req.approvals.exists()


def test_frames_are_denied(make_user: Any) -> None:
    response = login(make_user("alice")).get("/")
    assert response["X-Frame-Options"] == "DENY"


@pytest.mark.softhsm
def test_self_approval_is_refused_in_the_ui(pending_request: Any, make_user: Any) -> None:
    req = pending_request(ci={"actor": "dave"})
    dave = make_user("dave")
    client = login(dave)
    page = client.get(f"/requests/{req.pk}/")
    assert b"someone else must approve it" in page.content
    code = totp_code(totp_device(dave))
    response = client.post(
        f"/requests/{req.pk}/decide", {"decision": "approve", "otp_token": code}, follow=True
    )
    assert b"someone else must decide" in response.content
    assert not req.approvals.exists()


@pytest.mark.softhsm
def test_a_decision_without_a_code_is_refused_in_the_ui(
    pending_request: Any, make_user: Any
) -> None:
    req = pending_request()
    alice = make_user("alice")
    totp_device(alice)
    response = login(alice).post(f"/requests/{req.pk}/decide", {"decision": "approve"}, follow=True)
    assert b"fresh authenticator code" in response.content
    assert not req.approvals.exists()


@pytest.mark.softhsm
def test_the_request_page_shows_the_diff_against_the_last_signed_version(
    pending_request: Any, make_user: Any
) -> None:
    from approvals.services import decide

    first = pending_request(version="1.0.0")
    for name in ("alice", "bob"):
        decide(first.pk, make_user(name), "approve", otp_verified_at=timezone.now())
    d = lambda s: hashlib.sha256(s).hexdigest()  # noqa: E731
    second = pending_request(version="1.1.0", resources=[
        {"name": "weights.bin", "algorithm": "sha256", "digest": d(b"new")},
        {"name": "tokenizer.json", "algorithm": "sha256", "digest": d(b"t")},
    ])  # fmt: skip
    page = login(make_user("erin")).get(f"/requests/{second.pk}/").content.decode()
    assert "compared with 1.0.0" in page
    assert "1 added" in page and "1 changed" in page and "0 removed" in page
    assert "tokenizer.json" in page
    assert second.statement_digest in page
