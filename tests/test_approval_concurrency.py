"""Approvals landing at the same moment: one signature, one approval per person."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from approvals.models import Approval
from approvals.services import decide
from signing_service.models import Signature, SigningRequest
from signing_service.signing import SigningRefused

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]


def run_together(calls: list[Callable[[], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except SigningRefused as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_two_approvals_completing_the_quorum_at_once_sign_once(
    pending_request: Any, make_user: Any
) -> None:
    for _ in range(5):
        req = pending_request(version=f"v{timezone.now().timestamp()}")
        users = [make_user(f"a{req.pk.hex[:6]}"), make_user(f"b{req.pk.hex[:6]}")]
        run_together(
            [
                lambda u=u, pk=req.pk: decide(pk, u, "approve", otp_verified_at=timezone.now())
                for u in users
            ]
        )
        assert SigningRequest.objects.get(pk=req.pk).state == "signed"
        assert Signature.objects.filter(request=req).count() == 1
        assert Approval.objects.filter(request=req).count() == 2


def test_the_same_person_approving_twice_at_once_leaves_one_approval(
    pending_request: Any, make_user: Any
) -> None:
    req, alice = pending_request(), make_user("alice")
    results = run_together(
        [lambda: decide(req.pk, alice, "approve", otp_verified_at=timezone.now())] * 3
    )
    refusals = [r for r in results if isinstance(r, SigningRefused)]
    assert len(refusals) == 2
    assert all(r.code == "already_decided" for r in refusals)
    assert Approval.objects.filter(request=req).count() == 1
    assert SigningRequest.objects.get(pk=req.pk).state == "pending_approval"
