"""A retried POST with the same Idempotency-Key creates one request and one signature."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from signing_service.models import Signature, SigningRequest
from tests.fixtures_service import authed, request_body

pytestmark = pytest.mark.softhsm
URL = "/api/v1/signing-requests/"


@pytest.mark.django_db
def test_a_retry_returns_the_same_request(api: Any, issue_token: Any, active_keys: Any) -> None:
    client = authed(api, issue_token())
    first = client.post(URL, request_body(), format="json", HTTP_IDEMPOTENCY_KEY="build-42")
    again = client.post(URL, request_body(), format="json", HTTP_IDEMPOTENCY_KEY="build-42")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert SigningRequest.objects.count() == 1
    assert Signature.objects.count() == 1


@pytest.mark.django_db
def test_without_a_key_each_post_is_a_new_request(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    ids = {client.post(URL, request_body(), format="json").json()["id"] for _ in range(2)}
    assert len(ids) == 2


@pytest.mark.django_db
def test_reusing_a_key_for_another_body_is_refused(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    client.post(URL, request_body(), format="json", HTTP_IDEMPOTENCY_KEY="k1")
    response = client.post(
        URL, request_body(version="2.0.0"), format="json", HTTP_IDEMPOTENCY_KEY="k1"
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert SigningRequest.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_create_one_request(issue_token: Any, active_keys: Any) -> None:
    token = issue_token()
    results: list[int] = []
    barrier = threading.Barrier(4)

    def post() -> None:
        client = authed(APIClient(), token)
        barrier.wait()
        try:
            response = client.post(URL, request_body(), format="json", HTTP_IDEMPOTENCY_KEY="same")
            results.append(response.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 200, 201]
    assert SigningRequest.objects.count() == 1
    assert Signature.objects.count() == 1
