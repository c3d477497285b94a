"""Real browser: two custodians create a new staging key; the next signature uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group

from approvals.groups import custodian_group
from keys.models import KeyCeremony
from tests.fixtures_browser import CHROMIUM, PASSWORD, log_in
from tests.fixtures_service import authed, request_body, totp_code, totp_device

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]


def test_custodians_create_a_staging_key_in_the_browser(
    browser: Any,
    live_server: Any,
    make_user: Any,
    active_keys: Any,
    api: Any,
    issue_token: Any,
    tmp_path: Path,
) -> None:
    codes = {}
    for name in ("kim", "lee"):
        user = make_user(name, approves=(), password=PASSWORD)
        user.groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
        codes[name] = totp_code(totp_device(user))
    base = live_server.url
    kim = log_in(browser, base, "kim")
    kim.click("text=Keys")
    kim.select_option("select[name=authority]", "staging")
    kim.fill("form[action$='open'] input[name=otp_token]", codes["kim"])
    kim.click("text=Open ceremony")
    kim.wait_for_selector("text=Ask another custodian to confirm")
    lee = log_in(browser, base, "lee")
    lee.goto(f"{base}/custodian/")
    lee.fill("form[action$='confirm'] input[name=otp_token]", codes["lee"])
    lee.click("button:has-text('Confirm')")
    lee.wait_for_selector("text=Ceremony complete")
    lee.screenshot(path=str(tmp_path / "ceremony.png"), full_page=True)
    new_key = KeyCeremony.objects.get().key
    assert new_key is not None and new_key.fingerprint in lee.inner_text("#keys")
    body = (
        authed(api, issue_token())
        .post("/api/v1/signing-requests/", request_body(), format="json")
        .json()
    )
    assert body["state"] == "signed" and body["key"]["hint"] == new_key.hint
