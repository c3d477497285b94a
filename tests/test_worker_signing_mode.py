"""With ``SIGNING_MODE=worker`` the API and the approval quorum hand signing to the worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone

from approvals.services import decide
from signing_service.models import RequestState, Signature, SigningRequest
from tests.fixtures_service import authed, request_body
from tests.redis_fixtures import WorkerProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]


def wait_until_signed(pk: Any, worker: WorkerProcess, timeout: float = 30) -> SigningRequest:
    deadline = time.monotonic() + timeout
    while (req := SigningRequest.objects.get(pk=pk)).state != RequestState.SIGNED:
        assert time.monotonic() < deadline, f"still {req.state}\n{worker.output()}"
        time.sleep(0.05)
    return req


@pytest.fixture
def worker_mode(settings: Any) -> None:
    settings.SIGNING_MODE = "worker"


def test_the_api_answers_approved_and_the_worker_signs(
    worker_mode: None,
    celery_worker_process: WorkerProcess,
    active_keys: Any,
    api: Any,
    issue_token: Callable[..., str],
) -> None:
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["state"] == RequestState.APPROVED  # not signed in the request
    wait_until_signed(response.json()["id"], celery_worker_process)
    assert Signature.objects.filter(request_id=response.json()["id"]).count() == 1


def test_the_approval_that_completes_the_quorum_enqueues_signing(
    worker_mode: None,
    celery_worker_process: WorkerProcess,
    pending_request: Callable[..., Any],
    make_user: Callable[..., Any],
) -> None:
    req = pending_request()
    decide(req.pk, make_user("alice"), "approve", otp_verified_at=timezone.now())
    outcome = decide(req.pk, make_user("bob"), "approve", otp_verified_at=timezone.now())
    assert outcome.request.state == RequestState.APPROVED
    wait_until_signed(req.pk, celery_worker_process)
    assert Signature.objects.filter(request=req).count() == 1


def test_a_request_is_accepted_and_kept_while_the_broker_is_down(
    worker_mode: None,
    active_keys: Any,
    api: Any,
    issue_token: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down is not the CI job's problem: 201, stored, and the reconciler enqueues it later."""
    from tests.redis_fixtures import _use_broker, free_port
    from worker.celery import app

    previous = app.conf.broker_url
    _use_broker(app, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        started = time.monotonic()
        response = authed(api, issue_token()).post(
            "/api/v1/signing-requests/", request_body(), format="json"
        )
        elapsed = time.monotonic() - started
    finally:
        _use_broker(app, previous)
    assert response.status_code == 201, response.content
    assert response.json()["state"] == RequestState.APPROVED
    assert SigningRequest.objects.filter(pk=response.json()["id"]).exists()
    assert "could not enqueue" in caplog.text and "the reconciler will" in caplog.text
    print(f"submit with the broker down answered in {elapsed:.2f} s")
