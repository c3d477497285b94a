"""kill -9 of the worker, again and again, while 1,000 re-signings are in flight: afterwards
every signature is re-signed exactly once (0 lost, 0 duplicates, counted by queries).

Real redis-server, real ``celery worker`` subprocesses (prefork, 2 processes), the session's
SoftHSM token and a file-backed SQLite database shared with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db.models import Count
from django.utils import timezone

from keys import resigning
from keys.models import ResignBatch
from signing_service import audit, bundle
from signing_service.models import AuditEntry, Signature
from tests.redis_fixtures import WorkerProcess
from tests.resigning_helpers import backdate, bulk_signed, rotate, wait_for
from worker.tasks.resign import sweep_resigning

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

N = 1_000
KILLS = 4


def resigned(batch: ResignBatch) -> int:
    return Signature.objects.filter(supersedes__resign_batch=batch).count()


def test_killing_the_worker_loses_no_re_signing_and_duplicates_none(
    celery_workers: Callable[[], WorkerProcess],
    active_keys: Any,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.SIGNING_MODE = "worker"
    # Chunks of 50 (the sender's size): each is claimed, signed and stored as one, and a
    # kill lands before, during or after a chunk's transaction while others wait queued.
    monkeypatch.setattr(resigning, "CHUNK", 50)
    old = backdate(active_keys["staging"])
    olds = bulk_signed(old, N, start=timezone.now() - timedelta(days=20), step=timedelta(minutes=1))
    new = rotate(old)  # plans after the commit and sends 20 chunks of 50 to Redis
    batch = ResignBatch.objects.get()
    assert (batch.state, batch.total) == ("running", N)
    at_kill = []
    for kill in range(KILLS):
        worker = celery_workers()
        target = resigned(batch) + 60 + 40 * kill
        wait_for(
            lambda target=target: resigned(batch) >= target,
            timeout=120,
            what=f"progress\n{worker.output()}",
        )
        worker.kill()  # kill -9 of the worker and its pool children, mid-chunk
        at_kill.append(resigned(batch))
    assert at_kill[-1] < N, f"the kills came too late to matter: {at_kill}"
    final = celery_workers()
    deadline = time.monotonic() + 240
    while ResignBatch.objects.get(pk=batch.pk).state != "completed":
        assert time.monotonic() < deadline, (
            f"at kills {at_kill}, now {resigned(batch)}\n{final.output()}"
        )
        time.sleep(1.5)
        sweep_resigning(stall_seconds=1)  # what beat does every minute, sped up

    old_pks = [s.pk for s in olds]
    assert Signature.objects.filter(pk__in=old_pks, state="superseded").count() == N
    assert Signature.objects.filter(supersedes__in=old_pks).count() == N
    per_request = (
        Signature.objects.filter(key=new).values("request").annotate(n=Count("id")).order_by()
    )
    assert per_request.count() == N
    assert not per_request.filter(n__gt=1).exists()
    assert Signature.objects.filter(key=new, supersedes__isnull=True).count() == 0
    assert AuditEntry.objects.filter(action="signature.resigned").count() == N
    batch.refresh_from_db()
    assert batch.failures == []
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)
    public = bundle.load_public_key(new.public_key_pem)
    for sig in Signature.objects.filter(key=new).order_by("?")[:50]:
        bundle.verify_bundle(sig.bundle, public)
    resent = AuditEntry.objects.filter(action="resign_batch.resent").count()
    print(f"\nre-signed at each kill: {at_kill}; batches re-sent by the sweep: {resent}")
