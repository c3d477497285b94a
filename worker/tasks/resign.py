"""Re-signing tasks: re-sign a chunk of a batch, and a sweep that loses nothing.

Every task may run twice or concurrently (``acks_late`` redelivers the message of a worker
that died): :func:`keys.resigning.resign_many` is idempotent, so repeats are harmless. The
sweep is what makes a lost Redis or a killed worker lose nothing: it plans every key-based
authority again and re-sends the remaining signatures of running batches that stopped
making progress.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Task
from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import Max
from django.utils import timezone

from keys import resigning
from keys.backends.base import KeyBackendError
from keys.models import ResignBatch
from keys.registry import backend_for
from signing_service import audit
from signing_service.models import AuditEntry, Signature
from signing_service.policy import current_policy
from worker.celery import app

log = logging.getLogger(__name__)

# Queues: resign_chunk runs on "signing" (its name starts with resign_), sweep_resigning on
# "maintenance", routed by CELERY_TASK_ROUTES.

BEAT_SCHEDULE = {
    "sweep-resigning": {
        "task": "worker.tasks.resign.sweep_resigning",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
}

#: How long a chunk waits for its key backend to come back before the next try.
BACKEND_RETRY_SECONDS = 30


def enqueue_batch(batch_id: Any) -> None:
    """Send a running batch's remaining signatures to the worker once the transaction commits.

    The ids are read after the commit, so the worker never looks for rows it cannot see. If
    the broker is unreachable the error is logged and the sweep sends them later.
    """
    pk = str(batch_id)
    transaction.on_commit(lambda: send_remaining(pk), robust=True)


def send_remaining(batch_id: str) -> int:
    batch = ResignBatch.objects.get(pk=batch_id)
    if batch.state != ResignBatch.State.RUNNING:
        return 0
    ids = list(resigning.remaining(batch).order_by("pk").values_list("pk", flat=True))
    for chunk in resigning.chunks(ids):  # resigning.CHUNK signatures per message
        resign_chunk.delay(batch_id, chunk)
    return len(ids)


@app.task(
    bind=True,
    acks_late=True,
    max_retries=20,
    soft_time_limit=120,
    time_limit=150,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
)
def resign_chunk(self: Task, batch_id: str, signature_ids: list[int]) -> dict[str, int]:
    """Re-sign these signatures of the batch (stored together); count the outcomes. Safe to
    run twice."""
    outcomes, waiting = resigning.resign_many(batch_id, signature_ids)
    if waiting:
        # The backend is down. Never another key: try these later.
        raise self.retry(args=[batch_id, waiting], countdown=BACKEND_RETRY_SECONDS)
    resigning.finish_if_done(batch_id)
    return outcomes


@app.task(acks_late=True, max_retries=0, soft_time_limit=120, time_limit=150)
def sweep_resigning(stall_seconds: int | None = None) -> dict[str, int]:
    """Plan every key-based authority; complete, or send again, what running batches left."""
    if stall_seconds is None:
        stall_seconds = settings.RESIGN_STALL_SECONDS
    planned = 0
    for name, authority in current_policy().authorities.items():
        if authority.type == "key-based":
            planned += len(resigning.plan_for_authority(name))
    cutoff = timezone.now() - timedelta(seconds=stall_seconds)
    completed = resent = 0
    for pk in ResignBatch.objects.filter(state=ResignBatch.State.RUNNING).values_list(
        "pk", flat=True
    ):
        if resigning.finish_if_done(pk):
            completed += 1
        elif _stalled(pk, cutoff) and not _backend_down(pk):
            resent += _send_again(pk)
    if planned or completed or resent:
        log.info("re-sign sweep: %d planned, %d completed, %d re-sent", planned, completed, resent)
    return {"planned": planned, "completed": completed, "resent": resent}


def _stalled(batch_id: Any, cutoff: datetime) -> bool:
    """No re-signature, no start and no re-send since ``cutoff``."""
    batch = ResignBatch.objects.get(pk=batch_id)
    moments = [
        batch.approved_at or batch.created_at,
        Signature.objects.filter(supersedes__resign_batch=batch).aggregate(m=Max("signed_at"))["m"],
        AuditEntry.objects.filter(target_id=str(batch.pk), action="resign_batch.resent")
        .order_by("-seq")
        .values_list("created_at", flat=True)
        .first(),
    ]
    return max(m for m in moments if m is not None) < cutoff


def _backend_down(batch_id: Any) -> str:
    """Why the batch's new key cannot sign now, or "": no re-send while its backend is down
    (every chunk would only wait and retry; the next sweep tries again)."""
    key = ResignBatch.objects.select_related("new_key").get(pk=batch_id).new_key
    try:
        health = backend_for(key).health()
    except KeyBackendError as exc:
        return str(exc)
    if not health.ok:
        log.warning("re-sign batch %s waits for the %s backend: %s", batch_id, key, health.detail)
    return "" if health.ok else health.detail


def _send_again(batch_id: Any) -> int:
    """Send the remaining signatures again (audited, so the next sweep waits its turn)."""
    with transaction.atomic():
        batch = ResignBatch.objects.get(pk=batch_id)
        left = resigning.remaining(batch).count()
        audit.record(
            resigning.ACTOR,
            "resign_batch.resent",
            target=batch,
            data={"remaining": left, "reason": "no progress; its messages may be lost"},
        )
        resigning.dispatch(batch.pk)
    return left
