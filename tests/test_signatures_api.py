"""GET /api/v1/signatures/: deny by default, filters, and `modelsign fetch` of the newest bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from approvals.groups import custodian_group
from keys.revocation import revoke
from tests.fixtures_service import authed, request_body

pytestmark = [pytest.mark.softhsm]
URL = "/api/v1/signatures/"


def sign(api: Any, token: str, version: str) -> dict[str, Any]:
    body = (
        authed(api, token)
        .post("/api/v1/signing-requests/", request_body(version=version), format="json")
        .json()
    )
    assert body["state"] == "signed"
    return body


@pytest.mark.django_db
def test_filters_and_scoping(api: Any, issue_token: Any, active_keys: Any, make_user: Any) -> None:
    token = issue_token()
    for version in ("1", "2"):
        sign(api, token, version)
    listing = authed(api, token).get(f"{URL}?model=demo-model&version=2").json()
    assert listing["count"] == 1 and listing["results"][0]["version"] == "2"
    assert listing["results"][0]["key"] == active_keys["staging"].hint
    by_key = authed(api, token).get(f"{URL}?key={active_keys['staging'].hint[:10]}").json()
    assert by_key["count"] == 2
    assert authed(api, token).get(f"{URL}?limit=x").status_code == 400
    other = issue_token(identity="model-release-bot@company.com", authorities=("production",))
    assert authed(api, other).get(URL).json()["count"] == 0
    api.credentials()  # no credentials at all
    assert api.get(URL).status_code in (401, 403)
    custodian = make_user("kim", approves=())
    custodian.groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
    client = Client()
    client.force_login(custodian)
    assert client.get(URL).json()["count"] == 2
    outsider = Client()
    outsider.force_login(make_user("alice"))
    assert outsider.get(URL).json()["count"] == 0


@pytest.mark.django_db
def test_signatures_are_listed_newest_first_and_paged(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    token = issue_token()
    ids = [sign(api, token, str(v))["id"] for v in range(5)]
    first = authed(api, token).get(f"{URL}?limit=3").json()
    rest = authed(api, token).get(f"{URL}?limit=3&offset=3").json()
    assert first["count"] == rest["count"] == 5
    listed = [r["request"] for r in first["results"] + rest["results"]]
    assert listed == ids[::-1]


@pytest.mark.django_db
def test_quarantined_signatures_are_listed_as_such(
    api: Any, issue_token: Any, active_keys: Any
) -> None:
    token = issue_token()
    sign(api, token, "1")
    revoke(active_keys["staging"].pk, reason="compromised", effective_at=None, actor="ir")
    # effective now: the earlier signature stays valid
    assert authed(api, token).get(f"{URL}?state=valid").json()["count"] == 1
    assert authed(api, token).get(f"{URL}?state=quarantined").json()["count"] == 0


@pytest.mark.django_db(transaction=True)
def test_modelsign_fetch_writes_the_newest_valid_bundle(
    live_server: Any, api: Any, issue_token: Any, active_keys: Any, tmp_path: Path, capsys: Any
) -> None:
    from signing_service.client.cli import main

    token = issue_token()
    first = sign(api, token, "7")
    out = tmp_path / "model.sig"
    argv = [
        "fetch",
        "--server",
        live_server.url,
        "--token",
        token,
        "--model",
        "demo-model",
        "--model-version",
        "7",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    served = authed(api, token).get(f"/api/v1/signing-requests/{first['id']}/bundle").content
    assert out.read_bytes() == served
    assert main([*argv[:-1], "8", "--out", str(out)]) == 1
    assert "no valid signature of demo-model 8" in capsys.readouterr().err
