"""The Celery app: ``celery -A worker.celery worker -Q signing,maintenance``.

Configuration comes from the Django settings (``CELERY_*``, see ``signing_service/settings.py``);
the beat schedule lives here, next to the tasks it names.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")

#: Every module of worker.tasks; each may declare ``BEAT_SCHEDULE`` (merged below).
TASK_MODULES = sorted(
    f"worker.tasks.{m.name}"
    for m in pkgutil.iter_modules([os.path.join(os.path.dirname(__file__), "tasks")])
)

app = Celery("modelsign", include=TASK_MODULES)
app.config_from_object("django.conf:settings", namespace="CELERY")


@app.on_after_finalize.connect
def _beat_schedule(sender: Celery, **_: Any) -> None:
    """The beat schedule, in code: the union of the task modules' ``BEAT_SCHEDULE`` dicts."""
    for name in TASK_MODULES:
        sender.conf.beat_schedule.update(
            getattr(importlib.import_module(name), "BEAT_SCHEDULE", {})
        )


@worker_process_init.connect
def _start_child_clean(**_: Any) -> None:
    """Each prefork child opens its own PKCS#11 session and database connection.

    Both are per process: a session or connection copied from the parent by fork is shared
    with it and with every sibling, and SoftHSM crashes on concurrent use of one session.
    """
    from django.db import connections

    from keys.backends.pkcs11 import reset_process_state

    reset_process_state()
    for conn in connections.all(initialized_only=True):
        conn.close()
