"""Real browser: two approvers enrol TOTP and approve a production re-sign batch.

Playwright (the Python package) drives Debian's chromium headless; nothing is downloaded.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from keys.models import ResignBatch
from signing_service import bundle
from signing_service.models import Signature
from tests.fixtures_browser import CHROMIUM, PASSWORD, log_in, totp_now
from tests.resigning_helpers import backdate, bulk_signed, rotate

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"),
]


def enrol_and_approve(page: Any, batch: ResignBatch) -> None:
    page.click("text=set up now")
    secret = page.inner_text("#totp-secret")
    page.fill("input[name=otp_token]", totp_now(secret))
    page.click("text=Confirm")
    page.wait_for_selector("text=Authenticator set up")
    page.click(f"#pending-resign-batches a[href='/resign-batches/{batch.pk}/']")
    assert batch.new_key.hint in page.inner_text("#new-key")
    assert page.inner_text("#batch-total") == str(batch.total)
    page.fill("input[name=comment]", "rotation list checked")
    page.click("button[value=approve]")
    page.wait_for_selector("text=You approved this re-sign batch")


def test_two_approvers_approve_a_production_batch_in_the_browser(
    browser: Any, live_server: Any, active_keys: Any, make_user: Any, tmp_path: Path
) -> None:
    for name in ("alice", "bob"):
        make_user(name, password=PASSWORD)
    make_user("carol", approves=(), password=PASSWORD)
    old = backdate(active_keys["production"])
    bulk_signed(old, 12, start=timezone.now() - timedelta(days=3), step=timedelta(hours=2))
    new = rotate(old)
    batch = ResignBatch.objects.select_related("new_key").get()
    assert batch.state == "pending_approval"

    base = live_server.url
    alice = log_in(browser, base, "alice")
    enrol_and_approve(alice, batch)
    assert alice.inner_text("#batch-approvals") == "1 of 2"
    assert not Signature.objects.filter(key=new).exists()
    bob = log_in(browser, base, "bob")
    enrol_and_approve(bob, batch)
    bob.reload()
    assert bob.inner_text("#batch-state") == "Completed"
    assert bob.inner_text("#batch-progress") == "12 of 12"
    bob.screenshot(path=str(tmp_path / "resign-approved.png"), full_page=True)

    public = bundle.load_public_key(new.public_key_pem)
    resigned = Signature.objects.filter(key=new, supersedes__key=old)
    assert resigned.count() == 12
    for sig in resigned:
        bundle.verify_bundle(sig.bundle, public)

    carol = log_in(browser, base, "carol")
    assert "pending-resign-batches" not in carol.content()
    response = carol.goto(f"{base}/resign-batches/{batch.pk}/")
    assert response is not None and response.status == 404
