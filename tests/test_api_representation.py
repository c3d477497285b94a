"""What POST /api/v1/signing-requests/ answers is what DRF's own serializers render, and what a
later GET reads back; a request signed at submission is stored signed in one transaction."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection, reset_queries
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers
from rest_framework.test import APIRequestFactory

from signing_service import audit, signing
from signing_service.api.serializers import KeySummarySerializer, SigningRequestSerializer
from signing_service.models import (
    AuditEntry,
    AuditHead,
    Signature,
    SignatureBundle,
    SigningRequest,
)
from tests.fixtures_service import authed, request_body
from tests.provenance_helpers import root_of, statement

URL = "/api/v1/signing-requests/"


def drf_rendering(req: SigningRequest) -> dict[str, Any]:
    """DRF's ModelSerializer rendering of the declared fields, instance by instance."""
    context = {"request": APIRequestFactory().get("/", HTTP_HOST="testserver")}
    ser = SigningRequestSerializer(req, context=context)
    return dict(serializers.ModelSerializer.to_representation(ser, req))


def fast_rendering(req: SigningRequest) -> dict[str, Any]:
    context = {"request": APIRequestFactory().get("/", HTTP_HOST="testserver")}
    return dict(SigningRequestSerializer(req, context=context).data)


def both(pk: str) -> tuple[dict[str, Any], dict[str, Any]]:
    req = SigningRequest.objects.select_related("provenance").get(pk=pk)
    return fast_rendering(req), drf_rendering(req)


@pytest.mark.softhsm
@pytest.mark.django_db
def test_every_kind_of_request_renders_as_drf_renders_it(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token(authorities=("staging", "production")))
    signed = client.post(URL, request_body(), format="json").json()
    pending = client.post(URL, request_body(environment="production"), format="json").json()
    body = request_body(version="2.0.0")
    body["provenance"] = statement(root_of(body["resources"]))
    with_provenance = client.post(URL, body, format="json").json()
    assert (signed["state"], pending["state"], with_provenance["state"]) == (
        "signed", "pending_approval", "signed",
    )  # fmt: skip
    for answered in (signed, pending, with_provenance):
        fast, drf = both(answered["id"])
        assert fast == drf
        assert list(fast) == list(SigningRequestSerializer.Meta.fields)
    # The key summary is KeySummarySerializer's, field for field.
    key = active_keys["staging"]
    assert signed["key"] == dict(KeySummarySerializer(key).data)
    assert pending["expires_at"] is not None and pending["signed_at"] is None


@pytest.mark.softhsm
@pytest.mark.django_db
def test_the_answer_to_a_signed_submission_is_what_a_later_read_returns(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    created = client.post(URL, request_body(), format="json")
    assert created.status_code == 201
    read = client.get(f"{URL}{created.json()['id']}/")
    assert created.json() == read.json()
    assert created.json()["state"] == "signed" and created.json()["signed_at"]


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_submission_signed_at_once_is_stored_signed_in_one_transaction(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    client.post(URL, request_body(), format="json")  # warm up: key checks, policy
    reset_queries()
    with CaptureQueriesContext(connection) as queries:
        answer = client.post(URL, request_body(version="2.0.0"), format="json").json()
    sql = [q["sql"] for q in queries.captured_queries]
    requests, signatures = SigningRequest._meta.db_table, Signature._meta.db_table
    # Signed first, then stored signed with its signature and audit records: one
    # transaction, one lock of the audit head, nothing claimed, updated or read back.
    inserted = [q for q in sql if q.startswith(f'INSERT INTO "{requests}"')]
    assert len(inserted) == 1 and "'signed'" in inserted[0], inserted
    assert [q for q in sql if q.startswith(f'UPDATE "{requests}"')] == []
    assert [q for q in sql if q.startswith("SELECT") and f'FROM "{requests}"' in q] == []
    assert [q for q in sql if q.startswith("SELECT") and f'FROM "{signatures}"' in q] == []
    bundles = SignatureBundle._meta.db_table  # the bundle's own row, in the same transaction
    assert sum(q.startswith(f'INSERT INTO "{bundles}"') for q in sql) == 1, sql
    head = AuditHead._meta.db_table
    assert sum(q.startswith("SELECT") and f'FROM "{head}"' in q for q in sql) == 1, sql
    assert sum(q in ("BEGIN", "COMMIT") or q.startswith("SAVEPOINT") for q in sql) <= 2, sql
    # The audit trail still says what the policy decided, then that it was signed.
    created = AuditEntry.objects.get(action="signing_request.created", target_id=answer["id"])
    issued = AuditEntry.objects.get(action="signature.issued", data__request=answer["id"])
    assert created.data["state"] == "approved" and issued.seq == created.seq + 1
    assert issued.target_id == str(Signature.objects.get(request_id=answer["id"]).pk)
    assert audit.verify_chain() == (issued.seq, None)


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_request_that_waited_is_claimed_and_read_once_with_its_provenance_joined(
    api: Any, issue_token: Any, request: pytest.FixtureRequest
) -> None:
    # No key yet: the request is claimed at submission, finds none, and waits (approved).
    request.getfixturevalue("hsm")
    waiting = authed(api, issue_token()).post(URL, request_body(), format="json").json()
    assert waiting["state"] == "approved" and "no active signing key" in waiting["waiting_reason"]
    request.getfixturevalue("active_keys")
    reset_queries()
    with CaptureQueriesContext(connection) as queries:
        signed = signing.sign(waiting["id"])
    assert signed.state == "signed" and signed.valid_signature() is not None
    table = SigningRequest._meta.db_table
    reads = [q["sql"] for q in queries.captured_queries if f'FROM "{table}"' in q["sql"]]
    assert len(reads) == 1 and 'LEFT OUTER JOIN "provenance_provenancerecord"' in reads[0]
    assert signing.sign(waiting["id"]).state == "signed"  # claimed once: a second call no-ops
    assert Signature.objects.filter(request_id=waiting["id"]).count() == 1
