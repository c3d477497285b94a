"""Signing requests that carry SLSA provenance: bad provenance is a 400 naming the problem
with nothing stored; good provenance is stored, bound to the request, signed with the model
and served at .../provenance (404 without provenance, 409 until signed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection, reset_queries
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from provenance.models import ProvenanceRecord
from signing_service import bundle, slsa
from signing_service.models import AuditEntry, Signature, SigningRequest
from tests.fixtures_service import authed, request_body
from tests.provenance_helpers import (
    BUILD_TYPE,
    COMMIT,
    GITHUB_BUILDER,
    SOURCE,
    bundle_payload,
    model_meta,
    root_of,
    statement,
)

URL = "/api/v1/signing-requests/"


def with_provenance(environment: str = "staging", **changes: Any) -> dict[str, Any]:
    body = request_body(environment=environment)
    body["provenance"] = statement(root_of(body["resources"]), **changes)
    return body


def changed(path: str, value: Any) -> dict[str, Any]:
    """A body whose provenance has ``value`` at the dotted ``path`` (None removes it)."""
    body = with_provenance()
    *parents, last = path.split(".")
    node = body["provenance"]
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return body


def two_subjects() -> dict[str, Any]:
    body = with_provenance()
    body["provenance"]["subject"].append({"name": "other", "digest": {"sha256": "ab" * 32}})
    return body


def too_big() -> dict[str, Any]:
    body = with_provenance()
    body["provenance"]["predicate"]["byproducts"] = [{"content": "x" * 300_000}]
    return body


BAD: list[tuple[str, Any, str]] = [
    (
        "wrong predicateType",
        lambda: changed("predicateType", "https://slsa.dev/provenance/v0.2"),
        "provenance: predicateType must be 'https://slsa.dev/provenance/v1'",
    ),
    (
        "wrong _type",
        lambda: changed("_type", "https://in-toto.io/Statement/v0.1"),
        "provenance: _type must be 'https://in-toto.io/Statement/v1'",
    ),
    ("two subjects", two_subjects, "subject must list exactly one subject (the model), got 2"),
    ("no subject", lambda: changed("subject", []), "exactly one subject (the model), got 0"),
    (
        "digest mismatch",
        lambda: changed("subject.0.digest.sha256", "ab" * 32),
        "provenance.subject[0].digest.sha256 is " + "ab" * 32,
    ),
    (
        "uppercase digest",
        lambda: changed("subject.0.digest.sha256", "AB" * 32),
        "subject[0].digest.sha256 must be 64 lowercase hex",
    ),
    (
        "builder not allowed",
        lambda: with_provenance(builder="https://evil.example/builder"),
        "provenance builder 'https://evil.example/builder' is not in provenance_builders",
    ),
    ("too big", too_big, "the limit is 262144"),
    (
        "missing builder id",
        lambda: changed("predicate.runDetails.builder.id", None),
        "predicate.runDetails.builder.id must be a non-empty string",
    ),
    (
        "missing buildType",
        lambda: changed("predicate.buildDefinition.buildType", None),
        "predicate.buildDefinition.buildType must be a non-empty string",
    ),
    (
        "missing externalParameters",
        lambda: changed("predicate.buildDefinition.externalParameters", None),
        "externalParameters must be a JSON object, got null",
    ),
    (
        "bidi in builder id",
        lambda: with_provenance(builder="https://ci.company.com/builders/\u202eevil"),
        "builder.id contains a control or formatting character U+202E",
    ),
    (
        "unknown statement field",
        lambda: changed("signatures", []),
        "signatures: is not a field of an in-toto Statement v1",
    ),
    ("not an object", lambda: changed("predicate", "x"), "predicate must be a JSON object"),
    (
        "authority without provenance_builders",
        lambda: with_provenance(environment="development"),
        "'development' accepts no provenance: add provenance_builders",
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("label", "make", "expected"), BAD, ids=[c[0] for c in BAD])
def test_it_refuses_bad_provenance_and_stores_nothing(
    api: Any, issue_token: Any, label: str, make: Any, expected: str
) -> None:
    token = issue_token(authorities=("staging", "development"))
    audit_before = AuditEntry.objects.count()
    response = authed(api, token).post(URL, make(), format="json")
    assert response.status_code == 400, response.content
    assert expected in response.json()["error"]["message"], response.json()
    assert SigningRequest.objects.count() == ProvenanceRecord.objects.count() == 0
    assert AuditEntry.objects.count() == audit_before


@pytest.mark.softhsm
@pytest.mark.django_db
def test_provenance_is_bound_signed_and_served(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    body = with_provenance()
    response = client.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    req = response.json()
    assert req["state"] == "signed"
    expected_digest = slsa.parse_statement(body["provenance"]).digest
    assert req["provenance"] == {
        "subject_digest": root_of(body["resources"]),
        "builder_id": GITHUB_BUILDER,
        "build_type": BUILD_TYPE,
        "statement_digest": expected_digest,
        "source_uri": SOURCE,
        "source_commit": COMMIT,
        "signed": True,
    }
    assert req["links"]["provenance"].endswith(f"{URL}{req['id']}/provenance")

    served = client.get(req["links"]["provenance"])
    assert served.status_code == 200
    assert served["Content-Type"] == bundle.BUNDLE_MEDIA_TYPE
    key = active_keys["staging"]
    verified = slsa.verify_bundle(served.content, bundle.load_public_key(key.public_key_pem))
    assert verified.payload_digest == expected_digest
    assert json.loads(bundle_payload(served.content)) == body["provenance"]

    model = client.get(req["links"]["bundle"]).content
    bundle.verify_bundle(model, bundle.load_public_key(key.public_key_pem))
    meta = model_meta(model)
    assert meta["provenance"] == {
        "subject_digest": root_of(body["resources"]),
        "builder_id": GITHUB_BUILDER,
        "build_type": BUILD_TYPE,
        "statement_digest": expected_digest,
    }
    record = ProvenanceRecord.objects.get(pk=req["id"])
    assert (record.key, record.statement_digest) == (key, expected_digest)
    sig = Signature.objects.get(request_id=req["id"])
    assert record.signed_at == sig.signed_at
    actions = list(
        AuditEntry.objects.filter(target_id=req["id"]).values_list("action", "data__payload_digest")
    )
    assert ("provenance.signed", expected_digest) in actions


@pytest.mark.softhsm
@pytest.mark.django_db
def test_the_request_statement_digest_covers_the_provenance(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    plain = client.post(URL, request_body(), format="json").json()
    first = client.post(URL, with_provenance(), format="json").json()
    other = client.post(URL, with_provenance(invocation="run 2"), format="json").json()
    digests = {r["statement_digest"] for r in (plain, first, other)}
    assert len(digests) == 3


@pytest.mark.softhsm
@pytest.mark.django_db
def test_an_idempotency_key_cannot_carry_other_provenance(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    first = client.post(URL, with_provenance(), format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert first.status_code == 201
    again = client.post(URL, with_provenance(), format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    other = client.post(
        URL, with_provenance(invocation="run 2"), format="json", HTTP_IDEMPOTENCY_KEY="k1"
    )
    assert other.status_code == 422
    assert SigningRequest.objects.count() == ProvenanceRecord.objects.count() == 1


@pytest.mark.softhsm
@pytest.mark.django_db
def test_provenance_endpoint_404_without_provenance_and_409_until_signed(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token(authorities=("staging", "production")))
    plain = client.post(URL, request_body(), format="json").json()
    assert plain["provenance"] is None and plain["links"]["provenance"] is None
    response = client.get(f"{URL}{plain['id']}/provenance")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "the request carries no provenance"

    pending = client.post(URL, with_provenance(environment="production"), format="json").json()
    assert pending["state"] == "pending_approval"
    assert pending["provenance"]["signed"] is False
    response = client.get(pending["links"]["provenance"])
    assert response.status_code == 409
    assert "pending_approval" in response.json()["error"]["message"]


@pytest.mark.softhsm
@pytest.mark.django_db
def test_another_identity_sees_no_provenance(api: Any, issue_token: Any, active_keys: Any) -> None:
    mine = authed(api, issue_token()).post(URL, with_provenance(), format="json").json()
    outsider = authed(api, issue_token(identity="ml-engineer-eve@company.com"))
    assert outsider.get(f"{URL}{mine['id']}/provenance").status_code == 404
    assert outsider.get(f"{URL}{mine['id']}/").status_code == 404


@pytest.mark.softhsm
@pytest.mark.django_db
def test_requests_without_provenance_never_query_for_it_on_their_own(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    client = authed(api, issue_token())
    client.post(URL, request_body(), format="json")  # warm up: key checks, policy
    reset_queries()  # the request resets the log too; capture must start from empty
    with CaptureQueriesContext(connection) as queries:
        response = client.post(URL, request_body(version="2.0.0"), format="json")
    assert response.json()["state"] == "signed"
    sql = [q["sql"] for q in queries.captured_queries]
    table = ProvenanceRecord._meta.db_table
    assert any('INSERT INTO "signing_service_signature"' in q for q in sql), sql
    assert [q for q in sql if f'FROM "{table}"' in q] == []
    # Signed at submission from the request just stored: nothing reads it back (a signer
    # that claims a stored request joins the provenance instead: test_signing_faults).
    requests = SigningRequest._meta.db_table
    assert [q for q in sql if q.startswith("SELECT") and f'FROM "{requests}"' in q] == []


@pytest.mark.softhsm
@pytest.mark.django_db
def test_the_approver_page_shows_the_provenance(
    api: Any, issue_token: Any, active_keys: Any, make_user: Any
) -> None:
    client = authed(api, issue_token(authorities=("production",)))
    with_prov = client.post(URL, with_provenance(environment="production"), format="json").json()
    plain = client.post(URL, request_body(environment="production"), format="json").json()
    browser = Client()
    assert browser.login(username=make_user("alice").username, password="pw-" + "x" * 12)
    page = browser.get(reverse("approvals:request", args=[with_prov["id"]])).content.decode()
    for shown in (GITHUB_BUILDER, BUILD_TYPE, f"{SOURCE} @ {COMMIT}"):
        assert shown in page
    assert with_prov["provenance"]["statement_digest"] in page
    page = browser.get(reverse("approvals:request", args=[plain["id"]])).content.decode()
    assert 'id="provenance-builder">none sent' in page
