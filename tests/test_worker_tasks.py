"""The Celery worker signs, reconciles and expires requests, and a killed worker loses none.

These tests run a real ``redis-server`` and real ``celery worker`` subprocesses that share the
file-backed test database and the SoftHSM token with the test process.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import pytest
from django.db.models import Count
from django.utils import timezone

from signing_service import audit, bundle, signing
from signing_service.manifest import DEFAULT_IGNORE_PATHS, Resource
from signing_service.models import AuditEntry, RequestState, Signature, SigningRequest
from signing_service.policy import current_policy
from tests.fixtures_service import CI_IDENTITY
from tests.redis_fixtures import WorkerProcess
from worker.tasks.signing import enqueue_signing, expire_requests, reconcile, sign_request

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]


def approved_request(n: int = 0) -> SigningRequest:
    """A staging (no-approval) request stored as ``approved``, without signing it inline."""
    principal = signing.Principal(CI_IDENTITY, frozenset({"staging"}))
    digest = hashlib.sha256(f"weights-{n}".encode()).hexdigest()
    sub = signing.Submission(
        model="demo-model",
        version=f"1.0.{n}",
        environment="staging",
        resources=[Resource(name="weights.bin", algorithm="sha256", digest=digest)],
        ignore_paths=list(DEFAULT_IGNORE_PATHS),
        ci={},
    )
    authority = current_policy().authority("staging")
    assert authority is not None
    req = signing._create(principal, authority, sub, signing.body_digest(sub), None)
    assert req.state == RequestState.APPROVED
    return req


def wait_for(done: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def states(pks: Iterable[Any]) -> dict[str, int]:
    rows = SigningRequest.objects.filter(pk__in=list(pks)).values_list("state", flat=True)
    counts: dict[str, int] = {}
    for state in rows:
        counts[state] = counts.get(state, 0) + 1
    return counts


def all_signed(pks: list[Any]) -> Callable[[], bool]:
    return lambda: states(pks).get(RequestState.SIGNED, 0) == len(pks)


def signature_counts(pks: list[Any]) -> dict[Any, int]:
    rows = (
        Signature.objects.filter(request__in=pks)
        .values("request")
        .annotate(n=Count("id"))
        .values_list("request", "n")
    )
    return dict(rows)


def test_it_signs_an_enqueued_request_in_the_worker(
    celery_worker_process: WorkerProcess, active_keys: Any
) -> None:
    req = approved_request()
    enqueue_signing(req.pk)
    wait_for(all_signed([req.pk]), what=f"signed request\n{celery_worker_process.output()}")
    sig = Signature.objects.get(request=req)
    key = active_keys["staging"]
    assert sig.key_id == key.pk
    verified = bundle.verify_bundle(sig.bundle, bundle.load_public_key(key.public_key_pem))
    assert verified is not None
    assert AuditEntry.objects.filter(action="signature.issued", target_id=str(sig.pk)).exists()


def test_it_enqueues_on_commit_only(
    celery_app_for_tests: Any, active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import transaction

    sent: list[str] = []
    monkeypatch.setattr(sign_request, "apply_async", lambda args, **options: sent.append(*args))
    req = approved_request()
    with transaction.atomic():
        enqueue_signing(req.pk)
        assert sent == []  # not before the row is visible to the worker
    assert sent == [str(req.pk)]


def test_reconcile_in_the_worker_signs_an_approved_request_nobody_enqueued(
    celery_workers: Callable[[], WorkerProcess],
    active_keys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECONCILE_AFTER_SECONDS", "0")  # read by the worker's settings
    worker = celery_workers()
    req = approved_request()
    reconcile.delay()  # through the maintenance queue, as beat sends it
    wait_for(all_signed([req.pk]), what=f"reconciled request\n{worker.output()}")
    assert signature_counts([req.pk]) == {req.pk: 1}


def test_reconcile_leaves_recently_approved_requests_alone(
    celery_app_for_tests: Any, active_keys: Any
) -> None:
    approved_request()
    assert reconcile() == {"reclaimed": 0, "requeued": 0}


def test_a_request_stuck_in_signing_is_reclaimed_and_signed_exactly_once(
    celery_worker_process: WorkerProcess, active_keys: Any
) -> None:
    stuck, fresh = approved_request(1), approved_request(2)
    long_ago = timezone.now() - timedelta(minutes=10)
    SigningRequest.objects.filter(pk=stuck.pk).update(state="signing", updated_at=long_ago)
    SigningRequest.objects.filter(pk=fresh.pk).update(state="signing")  # its worker is alive
    assert reconcile()["reclaimed"] == 1
    wait_for(all_signed([stuck.pk]), what=f"reclaimed request\n{celery_worker_process.output()}")
    assert AuditEntry.objects.filter(
        action="signing_request.reclaimed", target_id=str(stuck.pk)
    ).exists()
    # The dead worker's message comes back, beat runs again: still one signature.
    for _ in range(3):
        sign_request.delay(str(stuck.pk))
    reconcile()
    time.sleep(1)
    assert signature_counts([stuck.pk, fresh.pk]) == {stuck.pk: 1}
    assert SigningRequest.objects.get(pk=fresh.pk).state == RequestState.SIGNING


def test_a_late_worker_finishing_after_a_reclaim_publishes_no_second_signature(
    celery_worker_process: WorkerProcess, active_keys: Any
) -> None:
    req = approved_request()
    late = SigningRequest.objects.get(pk=req.pk)
    key, base = signing._check_before_signing(late)
    payload = bundle.statement_payload(
        signing._signed_statement(late, key, "2026-01-01T00:00Z", base)
    )
    der = signing.backend_for(key).sign(key.key_ref, bundle.pae(payload))  # signed, not stored
    SigningRequest.objects.filter(pk=req.pk).update(
        state="signing", updated_at=timezone.now() - timedelta(hours=1)
    )
    reconcile()
    wait_for(all_signed([req.pk]), what=f"re-signed request\n{celery_worker_process.output()}")
    assert signing._store(late, key, payload, der).state == RequestState.SIGNED
    assert signature_counts([req.pk]) == {req.pk: 1}


def test_it_expires_pending_requests_past_their_deadline(pending_request: Any) -> None:
    old, current = pending_request(), pending_request(version="2.0.0")
    SigningRequest.objects.filter(pk=old.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    expire_requests()
    assert SigningRequest.objects.get(pk=old.pk).state == RequestState.EXPIRED
    assert SigningRequest.objects.get(pk=current.pk).state == RequestState.PENDING_APPROVAL
    assert AuditEntry.objects.filter(action="signing_request.expired", target_id=str(old.pk))
    expire_requests()  # a second run changes nothing and records nothing
    assert AuditEntry.objects.filter(action="signing_request.expired").count() == 1


def test_killing_the_worker_loses_no_request_and_signs_none_twice(
    celery_workers: Callable[[], WorkerProcess], active_keys: Any, settings: Any
) -> None:
    pks = [approved_request(n).pk for n in range(50)]
    for pk in pks:
        enqueue_signing(pk)
    first = celery_workers()
    wait_for(lambda: states(pks).get(RequestState.SIGNED, 0) >= 3, timeout=30, what="progress")
    first.kill()  # kill -9 of the worker and its pool children, mid-queue
    at_kill = states(pks)
    celery_workers()
    settings.RECONCILE_AFTER_SECONDS = settings.STUCK_SIGNING_SECONDS = 1
    deadline = time.monotonic() + 60
    while not all_signed(pks)() and time.monotonic() < deadline:
        time.sleep(1.2)
        reconcile()  # what beat does every minute, sped up
    assert states(pks) == {RequestState.SIGNED: 50}, f"at kill: {at_kill}"
    assert signature_counts(pks) == dict.fromkeys(pks, 1)
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)


def test_a_request_waits_while_its_key_backend_is_down(
    celery_app_for_tests: Any, active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import Retry

    from keys.backends.base import BackendUnavailable

    class DownBackend:
        def check_usable(self, key_ref: Any) -> dict[str, Any]:
            raise BackendUnavailable("HSM unreachable")

        def sign(self, key_ref: Any, data: bytes) -> bytes:
            raise BackendUnavailable("HSM unreachable")

    monkeypatch.setattr(signing, "backend_for", lambda key: DownBackend())
    monkeypatch.setattr(signing, "_usable_checked", set())
    req = approved_request()
    with pytest.raises(Retry, match="Retry in 30s"):
        sign_request.apply(args=[str(req.pk)], throw=True)
    req.refresh_from_db()
    assert req.state == RequestState.APPROVED  # still waiting, not failed
    assert "key backend is unavailable: HSM unreachable" in req.waiting_reason
    assert not Signature.objects.filter(request=req).exists()
