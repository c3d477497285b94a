"""Loaded by pytest before Django (``-p tests.testenv`` in pyproject): isolate the test run.

Tests must never read or write the developer's ``./var`` (tokens, PINs, database).
"""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Iterator

import pytest

os.environ.setdefault("MODELSIGN_ENV", "test")
os.environ.setdefault("VAR_DIR", tempfile.mkdtemp(prefix="modelsign-test-var-"))
os.environ.pop("SOFTHSM2_CONF", None)
os.makedirs(os.path.join(os.environ["VAR_DIR"], "static"), exist_ok=True)

if os.environ["VAR_DIR"].startswith(tempfile.gettempdir()):
    import shutil

    atexit.register(shutil.rmtree, os.environ["VAR_DIR"], True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--postgres",
        action="store_true",
        help="run against a throwaway PostgreSQL cluster (Debian's server) started for this run",
    )


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Iterator[None]:
    # A wrapper runs before pytest-django's hook, which loads the settings (DATABASES).
    if early_config.known_args_namespace.postgres:
        from tests.postgres_server import PostgresUnavailable, start_cluster

        try:
            cluster = start_cluster()
        except PostgresUnavailable as exc:
            raise pytest.UsageError(f"--postgres: {exc}") from None
        atexit.register(cluster.stop)  # also if pytest never reaches its cleanups
        early_config.add_cleanup(cluster.stop)
        os.environ["DATABASE_URL"] = cluster.url
    return (yield)
