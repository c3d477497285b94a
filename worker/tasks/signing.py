"""Signing tasks: sign one request, put lost requests back in line, expire stale ones.

Every task may run twice or concurrently (``acks_late`` redelivers the message of a worker
that died): the conditional UPDATEs in :func:`signing_service.signing.sign` and here, plus
the unique (request, key) constraint on signatures, make repeats harmless.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Task
from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import F
from django.utils import timezone

from keys.models import SigningKey
from signing_service import audit, signing
from signing_service.models import RequestState, SigningRequest
from worker.celery import app
from worker.tasks import enqueue_on_commit

log = logging.getLogger(__name__)

# Queues: sign_request runs on "signing", the periodic tasks on "maintenance", routed by
# CELERY_TASK_ROUTES (Celery 5 deprecates the per-task ``queue`` attribute).

#: Periodic runs (merged into the beat schedule by worker.celery).
BEAT_SCHEDULE = {
    "reconcile-signing-requests": {
        "task": "worker.tasks.signing.reconcile",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    "expire-signing-requests": {
        "task": "worker.tasks.signing.expire_requests",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
}

#: Rows one reconcile or expire run handles; the next run (a minute later) takes the rest.
BATCH = 1000
#: How long a request waits for its key backend to come back before the next try.
BACKEND_RETRY_SECONDS = 30
#: A request reclaimed from dead workers this many times fails instead of being retried.
MAX_SIGN_ATTEMPTS = 5


def enqueue_signing(request_id: Any) -> None:
    """Sign ``request_id`` in the worker once the current transaction commits.

    On commit, so the worker never looks for a row it cannot see yet (or one rolled back).
    """
    enqueue_on_commit(sign_request, str(request_id))


def enqueue_waiting(authority: str) -> int:
    """Send the requests of ``authority`` that wait (no key, backend down) to the worker now."""
    pks = signing.waiting_ids(authority, BATCH)
    for pk in pks:
        enqueue_signing(pk)
    return len(pks)


@app.task(
    bind=True,
    acks_late=True,
    max_retries=20,
    soft_time_limit=60,
    time_limit=90,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
)
def sign_request(self: Task, request_id: str) -> str:
    """Sign one approved request; returns its state. A no-op unless it is ``approved``.

    When the key backend is down the request goes back to ``approved`` with its waiting
    reason (see :func:`signing_service.signing.sign`) and this task tries again shortly; when
    the authority has no active key it waits for the reconciler or the key's activation.
    """
    req = signing.sign(request_id)
    if (
        req.state == RequestState.APPROVED
        and req.waiting_reason
        and SigningKey.objects.active_for(req.authority) is not None
        and self.request.retries < (self.max_retries or 0)
    ):
        log.warning("request %s waits for its key backend: %s", request_id, req.waiting_reason)
        raise self.retry(countdown=BACKEND_RETRY_SECONDS)
    return str(req.state)


@app.task(acks_late=True, max_retries=0, soft_time_limit=120, time_limit=150)
def reconcile() -> dict[str, int]:
    """Re-enqueue approved requests nobody signed; take back requests whose worker died."""
    now = timezone.now()
    stuck = _reclaim_stuck(now - timedelta(seconds=settings.STUCK_SIGNING_SECONDS))
    waiting = _requeue_approved(now - timedelta(seconds=settings.RECONCILE_AFTER_SECONDS))
    if stuck or waiting:
        log.info("reconcile: %d reclaimed from signing, %d re-enqueued", stuck, waiting)
    return {"reclaimed": stuck, "requeued": waiting}


def _requeue_approved(cutoff: datetime) -> int:
    pks = list(
        SigningRequest.objects.filter(state=RequestState.APPROVED, updated_at__lt=cutoff)
        .order_by("updated_at")
        .values_list("pk", flat=True)[:BATCH]
    )
    for pk in pks:
        enqueue_signing(pk)
    return len(pks)


def _reclaim_stuck(cutoff: datetime) -> int:
    pks = list(
        SigningRequest.objects.filter(
            state=RequestState.SIGNING, updated_at__lt=cutoff
        ).values_list("pk", flat=True)[:BATCH]
    )
    return sum(_reclaim(pk, cutoff) for pk in pks)


def _reclaim(pk: Any, cutoff: datetime) -> bool:
    with transaction.atomic():
        # Conditional: a worker that finished (or another reconciler) in the meantime wins.
        moved = SigningRequest.objects.filter(
            pk=pk, state=RequestState.SIGNING, updated_at__lt=cutoff
        ).update(
            state=RequestState.APPROVED,
            sign_attempts=F("sign_attempts") + 1,
            updated_at=timezone.now(),
        )
        if not moved:
            return False
        req = SigningRequest.objects.get(pk=pk)
        if req.sign_attempts >= MAX_SIGN_ATTEMPTS:
            # The same request took its worker down every time: stop before it takes more.
            reason = (
                f"gave up after {req.sign_attempts} attempts: the signer died each time "
                "(see the worker log); submit the request again once the cause is fixed"
            )
            SigningRequest.objects.filter(pk=pk, state=RequestState.APPROVED).update(
                state=RequestState.FAILED, failure_reason=reason, updated_at=timezone.now()
            )
            audit.record(
                "signing-service", "signing_request.failed", target=req, data={"reason": reason}
            )
            return True
        audit.record(
            "signing-service",
            "signing_request.reclaimed",
            target=req,
            data={"reason": "stuck in signing; its worker is presumed dead",
                  "attempt": req.sign_attempts},
        )  # fmt: skip
        enqueue_signing(pk)
    return True


@app.task(acks_late=True, max_retries=0, soft_time_limit=120, time_limit=150)
def expire_requests() -> int:
    """Move pending requests past their approval deadline to ``expired``."""
    from approvals.services import _expire  # the one conditional, audited expiry

    pks = list(
        SigningRequest.objects.filter(
            state=RequestState.PENDING_APPROVAL, expires_at__lte=timezone.now()
        ).values_list("pk", flat=True)[:BATCH]
    )
    for pk in pks:
        _expire(pk)
    return len(pks)
