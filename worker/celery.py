"""The Celery app: ``celery -A worker.celery worker -Q signing,maintenance``.

Configuration comes from the Django settings (``CELERY_*``, see ``signing_service/settings.py``);
the beat schedule lives here, next to the tasks it names.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")

app = Celery("modelsign", include=["worker.tasks.signing"])
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.beat_schedule = {
    "reconcile-signing-requests": {
        "task": "worker.tasks.signing.reconcile",
        "schedule": 60.0,
        "options": {"queue": "maintenance", "expires": 55},
    },
    "expire-signing-requests": {
        "task": "worker.tasks.signing.expire_requests",
        "schedule": 60.0,
        "options": {"queue": "maintenance", "expires": 55},
    },
}


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
