"""Background work: the Celery app lives in :mod:`worker.celery`, tasks in :mod:`worker.tasks`.

Deliberately empty: importing ``worker`` must not import Celery (or Django), so nothing that
only needs a task's name pulls in the broker client.
"""
