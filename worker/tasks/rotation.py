"""Key rotation on a schedule: :func:`keys.rotation.run` every ROTATION_CHECK_SECONDS.

Runs on the "maintenance" queue (its name does not start with sign_ or resign_): it opens
ceremonies, retires keys and asks for re-sign plans, but never signs anything itself. Every
step re-checks its condition when it acts, so a run that overlaps another, or is redelivered
after its worker died, does each thing once.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings

from keys import rotation
from worker.celery import app

log = logging.getLogger(__name__)

#: Periodic runs (merged into the beat schedule by worker.celery).
BEAT_SCHEDULE = {
    "rotate-keys": {
        "task": "worker.tasks.rotation.rotate_keys",
        "schedule": float(settings.ROTATION_CHECK_SECONDS),
        # A run that waited longer than the interval is stale: the next one does its work.
        "options": {"expires": max(settings.ROTATION_CHECK_SECONDS - 5, 1)},
    },
}


@app.task(acks_late=True, max_retries=0, soft_time_limit=300, time_limit=360)
def rotate_keys() -> dict[str, Any]:
    """One rotation run; returns what it did (see :func:`keys.rotation.run`)."""
    report = rotation.run()
    done = {kind: len(items) for kind, items in report.items() if items}
    if report["errors"]:
        log.error("rotation run: %s", done)
    elif done:
        log.info("rotation run: %s", done)
    return report
