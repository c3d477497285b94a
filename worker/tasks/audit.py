"""Audit log tasks: sign the log's head with the audit checkpoint key, on a schedule.

``checkpoint_audit`` runs on the "maintenance" queue (its name does not start with
``sign_``): it never touches a model-signing key. Running it twice is harmless: a head that
did not move is not signed again, and the head row lock makes concurrent runs take turns.
"""

from __future__ import annotations

import logging

from celery import Task
from django.conf import settings
from django.db import OperationalError

from signing_service import audit_checkpoints
from worker.celery import app

log = logging.getLogger(__name__)

_INTERVAL = float(settings.AUDIT_CHECKPOINT_INTERVAL_SECONDS)

#: Periodic runs (merged into the beat schedule by worker.celery).
BEAT_SCHEDULE = {
    "audit-checkpoint": {
        "task": "worker.tasks.audit.checkpoint_audit",
        "schedule": _INTERVAL,
        # A run that waited longer than most of an interval is covered by the next one.
        "options": {"expires": _INTERVAL * 0.9},
    },
}


@app.task(
    bind=True,
    acks_late=True,
    max_retries=3,
    soft_time_limit=60,
    time_limit=90,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
)
def checkpoint_audit(self: Task) -> int | None:
    """Sign the audit log's head; returns the new checkpoint's number, or None if there was
    nothing new to sign or no checkpoint could be made (logged; the next run tries again)."""
    try:
        made = audit_checkpoints.create_checkpoint("worker:checkpoint_audit")
    except audit_checkpoints.CheckpointError as exc:
        # Not retried: a missing key or a log that contradicts a checkpoint needs a person.
        log.error("audit checkpoint not made: %s", exc)
        return None
    if made is None:
        return None
    log.info("audit checkpoint #%s signs entry %s", made.number, made.seq)
    return made.number
