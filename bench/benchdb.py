"""The throwaway PostgreSQL of ``--database postgres`` (bench_resign.py, bench_revocation.py)."""

from __future__ import annotations

import os
from typing import Any


def start_postgres() -> Any:
    """A throwaway PostgreSQL cluster (fsync off, as in the tests); DATABASE_URL points at it.

    Call before Django reads its settings.
    """
    from tests.postgres_server import PostgresUnavailable, start_cluster

    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        raise SystemExit(f"--database postgres: {exc}") from None
    os.environ["DATABASE_URL"] = cluster.url
    return cluster


def stop_postgres(cluster: Any) -> None:
    """Close Django's connections, then remove the cluster (``None``: nothing to do)."""
    if cluster is None:
        return
    from django.db import connections

    connections.close_all()
    cluster.stop()
