"""Celery tasks. They take primary keys (never model instances) and are safe to run twice."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

log = logging.getLogger(__name__)

#: Publishing gives up quickly: a web request must not hang on a dead broker.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}


def enqueue_on_commit(task: Any, *args: Any) -> None:
    """Send ``task(*args)`` once the current transaction commits; never raise doing it.

    Redis only carries hints: if the broker is unreachable the row stays in its waiting state
    in the database and the periodic sweeps (reconcile, re-sign sweep) enqueue it again, so a
    failed publish is logged, not raised into the web request that already committed.
    """

    def send() -> None:
        try:
            task.apply_async(args=args, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
        except Exception as exc:  # any broker failure: the database still has the work
            log.warning(
                "could not enqueue %s%r (%s); the reconciler will enqueue it again",
                task.name, args, exc,
            )  # fmt: skip

    transaction.on_commit(send)
