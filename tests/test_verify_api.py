"""POST /api/v1/verify/: the deployment gate from the service's own trust state."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.fixtures_service import authed, request_body

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]
URL = "/api/v1/verify/"


@pytest.fixture
def signed(
    api: Any, issue_token: Any, active_keys: Any
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    client = authed(api, issue_token())
    body = request_body()
    rid = client.post("/api/v1/signing-requests/", body, format="json").json()["id"]
    return json.loads(client.get(f"/api/v1/signing-requests/{rid}/bundle").content), body[
        "resources"
    ]


def verify(payload: dict[str, Any]) -> Any:
    return APIClient().post(URL, payload, format="json")  # no credentials: admission controllers


def test_a_good_bundle_and_its_files_are_accepted(signed: Any) -> None:
    bundle, resources = signed
    response = verify(
        {"deployment": "development_deployment", "bundle": bundle, "resources": resources}
    )
    assert response.status_code == 200
    result = response.json()
    assert result["verdict"] == "accept", result
    assert {c["name"] for c in result["checks"]} >= {
        "bundle signature",
        "key state",
        "authority",
        "model files",
    }


def test_changed_files_and_policy_failures_are_rejected(signed: Any) -> None:
    bundle, resources = signed
    changed = [dict(resources[0], digest="0" * 64)]
    result = verify(
        {"deployment": "development_deployment", "bundle": bundle, "resources": changed}
    ).json()
    assert result["verdict"] == "reject"
    assert any("changed file: weights.bin" in c["detail"] for c in result["checks"] if not c["ok"])
    # production_deployment accepts only the production authority, and wants provenance.
    prod = verify({"deployment": "production_deployment", "bundle": bundle}).json()
    assert prod["verdict"] == "reject"
    assert {c["name"] for c in prod["checks"] if not c["ok"]} == {"authority", "provenance"}


def test_unsigned_and_bad_input(signed: Any) -> None:
    assert verify({"deployment": "staging_deployment"}).json()["verdict"] == "reject"
    assert verify({"deployment": "development_deployment"}).json()["verdict"] == "accept"
    response = verify({"deployment": "nowhere", "bundle": signed[0]})
    assert (
        response.status_code == 400
        and "no deployment 'nowhere'" in response.json()["error"]["message"]
    )
    bad = verify(
        {
            "deployment": "development_deployment",
            "bundle": signed[0],
            "resources": [{"name": "/etc/x", "digest": "0" * 64}],
        }
    )
    assert bad.status_code == 400 and "absolute path" in bad.json()["error"]["message"]
