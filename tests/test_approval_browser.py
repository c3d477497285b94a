"""Real browser: two approvers enrol TOTP and approve; the waiting CI client gets a bundle.

Playwright (the Python package) drives Debian's chromium headless; nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from signing_service.models import SigningRequest
from tests.fixtures_browser import CHROMIUM, PASSWORD, log_in, totp_now
from tests.fixtures_service import model_signing_verify, write_model

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.interop,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"),
]


def enrol_and_approve(page: Any, base: str, req: SigningRequest) -> None:
    page.click("text=set up now")
    secret = page.inner_text("#totp-secret")
    page.fill("input[name=otp_token]", totp_now(secret))
    page.click("text=Confirm")
    page.wait_for_selector("text=Authenticator set up")
    page.click(f"a[href='/requests/{req.pk}/']")
    assert req.statement_digest in page.inner_text("#statement-digest")
    page.fill("input[name=comment]", "diff reviewed")
    page.click("button[value=approve]")
    page.wait_for_selector("text=You approved this request")


def start_client(live_server: Any, token: str, model: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "signing_service.client", "sign", str(model),
         "--server", live_server.url, "--environment", "production", "--token", token,
         "--out", str(out), "--timeout", "180"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for_request() -> SigningRequest:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        req = SigningRequest.objects.first()
        if req is not None:
            return req
        time.sleep(0.2)
    raise AssertionError("the CI client never submitted its request")


def test_two_approvers_in_the_browser_unblock_the_ci_client(
    browser: Any,
    live_server: Any,
    issue_token: Any,
    active_keys: Any,
    make_user: Any,
    tmp_path: Path,
) -> None:
    for name in ("alice", "bob"):
        make_user(name, password=PASSWORD)
    make_user("carol", approves=(), password=PASSWORD)
    model = write_model(tmp_path / "resnet", {"model.bin": os.urandom(2048), "config.json": b"{}"})
    out = tmp_path / "model.sig"
    client = start_client(live_server, issue_token(authorities=("production",)), model, out)
    try:
        req = wait_for_request()
        base = live_server.url
        alice = log_in(browser, base, "alice")
        enrol_and_approve(alice, base, req)
        assert "1 of 2" in alice.inner_text("#approval-count")
        bob = log_in(browser, base, "bob")
        enrol_and_approve(bob, base, req)
        bob.screenshot(path=str(tmp_path / "approved.png"), full_page=True)
        output, _ = client.communicate(timeout=120)
    finally:
        client.kill()
    assert client.returncode == 0, output
    assert f"/requests/{req.pk}/" in output  # the client printed the approval page
    req.refresh_from_db()
    assert req.state == "signed"

    pem = tmp_path / "production.pem"
    pem.write_text(active_keys["production"].public_key_pem)
    result = model_signing_verify(model, out, pem)
    assert result.returncode == 0, result.stdout + result.stderr

    carol = log_in(browser, base, "carol")
    assert "resnet" not in carol.content()
    response = carol.goto(f"{base}/requests/{req.pk}/")
    assert response is not None and response.status == 404
