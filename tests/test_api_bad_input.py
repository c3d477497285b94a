"""Bad input gets a 4xx whose message names the problem, and nothing is stored (SPEC 11)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from signing_service.models import AuditEntry, SigningRequest
from tests.fixtures_service import authed, request_body

D = "ab" * 32  # a well-formed digest


def res(*names: str) -> list[dict[str, str]]:
    return [{"name": n, "algorithm": "sha256", "digest": D} for n in names]


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("absolute path", {"resources": res("/etc/passwd")}, "absolute path"),
    ("dot-dot segment", {"resources": res("a/../../b")}, "'..' path segment"),
    ("backslash", {"resources": res("a\\b")}, "backslash"),
    ("NUL", {"resources": res("a\x00b")}, "NUL"),
    ("control character", {"resources": res("a\x1bb")}, "control character U+001B"),
    (
        "bidi override",
        {"resources": res("evil\u202etxt.bin")},
        "bidirectional control character U+202E",
    ),
    ("empty segment", {"resources": res("a//b")}, "empty or '.' path segment"),
    (
        "NFC collision",
        {"resources": res("caf\u00e9.bin", "cafe\u0301.bin")},
        "after Unicode normalisation",
    ),
    ("exact duplicate", {"resources": res("a.bin", "a.bin")}, "after Unicode normalisation"),
    ("file is also a dir", {"resources": res("a", "a/b")}, "is also the directory of"),
    ("dot among others", {"resources": res(".", "b")}, "must be the only resource"),
    (
        "short digest",
        {"resources": [{"name": "a", "algorithm": "sha256", "digest": "ab" * 31}]},
        "resources[0].digest",
    ),
    (
        "uppercase digest",
        {"resources": [{"name": "a", "algorithm": "sha256", "digest": "AB" * 32}]},
        "lowercase hex",
    ),
    (
        "digest not a string",
        {"resources": [{"name": "a", "algorithm": "sha256", "digest": 5}]},
        "resources[0].digest",
    ),
    (
        "unknown algorithm",
        {"resources": [{"name": "a", "algorithm": "md5", "digest": D}]},
        "unsupported algorithm 'md5'",
    ),
    (
        "unknown resource field",
        {"resources": [{"name": "a", "digest": D, "size": 1, "mode": 7}]},
        "unknown field(s): mode",
    ),
    ("no resources", {"resources": []}, "at least one file"),
    ("resources not a list", {"resources": {"a": D}}, "must be a list"),
    ("name not a string", {"resources": [{"name": 7, "digest": D}]}, "resources[0].name"),
    ("bad ignore path", {"ignore_paths": ["../x"]}, "ignore_paths"),
    ("control char in model", {"model": "m\u200bodel"}, "U+200B"),
    ("unknown top-level field", {"key_id": "mine"}, "key_id: is not a known field"),
    ("missing version", {"version": None}, "version"),
    ("bad pipeline url", {"ci": {"pipeline_url": "javascript:alert(1)"}}, "pipeline_url"),
    ("unknown environment", {"environment": "prod"}, "unknown environment 'prod'"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("label", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_it_refuses_bad_input_and_stores_nothing(
    api: Any, issue_token: Any, label: str, change: dict[str, Any], expected: str
) -> None:
    token = issue_token()
    audit_before = AuditEntry.objects.count()
    body = request_body(**{k: v for k, v in change.items() if v is not None})
    for key, value in change.items():
        if value is None:
            body.pop(key)
    response = authed(api, token).post("/api/v1/signing-requests/", body, format="json")
    assert 400 <= response.status_code < 500, response.content
    error = response.json()["error"]
    assert expected in error["message"], error
    assert SigningRequest.objects.count() == 0
    assert AuditEntry.objects.count() == audit_before


def post_raw(api: Any, token: str, raw: bytes, **extra: Any) -> Any:
    return authed(api, token).generic(
        "POST", "/api/v1/signing-requests/", raw, content_type="application/json", **extra
    )


@pytest.mark.django_db
def test_it_refuses_oversized_bodies_with_413(api: Any, issue_token: Any, settings: Any) -> None:
    settings.MAX_REQUEST_BODY_BYTES = 4096
    body = json.dumps(request_body(resources=res(*[f"f{i}" for i in range(100)]))).encode()
    response = post_raw(api, issue_token(), body)
    assert response.status_code == 413
    assert "limit is 4096" in response.json()["error"]["message"]
    assert SigningRequest.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_too_many_resources(api: Any, issue_token: Any, settings: Any) -> None:
    settings.MAX_RESOURCES = 10
    body = request_body(resources=res(*[f"f{i}" for i in range(11)]))
    response = authed(api, issue_token()).post("/api/v1/signing-requests/", body, format="json")
    assert response.status_code == 400
    assert "has 11 entries; at most 10" in response.json()["error"]["message"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper than 16"),
        (b'{"model": "a", "model": "b"}', "key 'model' twice"),
        (b'{"model": NaN}', "NaN is not allowed"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "Expected a dictionary"),
    ],
    ids=["deep-recursion", "deep", "duplicate-key", "nan", "utf8", "syntax", "not-object"],
)
def test_it_refuses_malformed_json(api: Any, issue_token: Any, raw: bytes, expected: str) -> None:
    response = post_raw(api, issue_token(), raw)
    assert response.status_code == 400
    assert expected in response.json()["error"]["message"]
    assert SigningRequest.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_a_bad_idempotency_key(api: Any, issue_token: Any) -> None:
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json", HTTP_IDEMPOTENCY_KEY="x" * 300
    )
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_unknown_api_paths_answer_json_404(api: Any) -> None:
    response = api.get("/api/v1/nope/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
