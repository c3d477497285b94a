"""pytest plugin: a real Redis broker and a real Celery worker for the tests that need them.

``redis_url`` starts Debian's ``redis-server`` on a free loopback port once per session;
``celery_worker_process`` starts ``celery worker`` as a subprocess that shares the test
database (file-backed SQLite or PostgreSQL, so use ``django_db(transaction=True)``) and the
SoftHSM token.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    # redis-server cannot take port 0, so ask the OS for a free port and hand it over.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
         "--port", str(port), "--dir", str(workdir)],
        stdout=(workdir / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers_ping(port):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start: {(workdir / 'redis.log').read_text()}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:<port>/0`` of a private, memory-only redis-server."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail(f"{REDIS_SERVER} is required (apt-get install redis-server)")
    proc, port = _start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc, timeout=5)


def _stop(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM the process group, SIGKILL it if it does not go in time."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(5)


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig) if _own_group(proc) else proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _own_group(proc: subprocess.Popen[Any]) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


@dataclass
class WorkerProcess:
    """A running ``celery worker``; ``kill()`` is ``kill -9`` of it and its pool children."""

    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only the worker's tree
        self.proc.wait(10)

    def stop(self) -> None:
        _stop(self.proc, timeout=15)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def database_url() -> str:
    """``DATABASE_URL`` of the database this test process uses now (the test database).

    pytest-django renames the database after the settings loaded, so the environment's
    ``DATABASE_URL`` names the wrong one: build it from the live settings, either engine.
    """
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    if db["ENGINE"] == "django.db.backends.postgresql":
        credentials = quote(db["USER"], safe="")
        if db["PASSWORD"]:
            credentials += ":" + quote(db["PASSWORD"], safe="")
        host = f"{db['HOST']}:{db['PORT']}" if db["PORT"] else db["HOST"]
        return f"postgres://{credentials}@{host}/{quote(db['NAME'], safe='')}"
    raise RuntimeError(f"subprocesses cannot share a {db['ENGINE']} test database")


def worker_env(redis_url: str) -> dict[str, str]:
    """The test process's environment, pointed at its database, HSM settings and broker."""
    from django.conf import settings

    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "PKCS11_MODULE": settings.PKCS11_MODULE,
        "PKCS11_PIN_FILE": str(settings.PKCS11_PIN_FILE),
        "DJANGO_SETTINGS_MODULE": "signing_service.settings",
        "REDIS_URL": redis_url,
        "C_FORCE_ROOT": "1",  # containers run tests as root; the pool is json-only anyway
    }


def start_worker(redis_url: str, log: Path) -> WorkerProcess:
    """Start a worker and wait until it consumes; its own session so kill() takes all of it."""
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery", "worker",
        "-Q", "signing,maintenance", "--pool", "prefork", "--concurrency", "2",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=ROOT, env=worker_env(redis_url), start_new_session=True,
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = WorkerProcess(proc, log)
    _wait_ready(worker)
    return worker


def _wait_ready(worker: WorkerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"the celery worker exited:\n{worker.output()}")
        if " ready." in worker.output():
            return
        time.sleep(0.1)
    worker.stop()
    raise RuntimeError(f"the celery worker did not get ready:\n{worker.output()}")


@pytest.fixture
def celery_app_for_tests(redis_url: str) -> Iterator[Any]:
    """The app in this process, publishing to an empty test broker (tasks never run here)."""
    import redis

    from worker.celery import app

    redis.Redis.from_url(redis_url).flushdb()  # no message left over from an earlier test
    previous = app.conf.broker_url
    _use_broker(app, redis_url)
    try:
        yield app
    finally:
        _use_broker(app, previous)


def _use_broker(app: Any, url: str) -> None:
    # The app caches its pools for the old URL: drop the references (kombu keeps one pool
    # per URL for the process, so closing them would break the next test on the same URL).
    app.conf.broker_url = url
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def celery_workers(
    celery_app_for_tests: Any, redis_url: str, hsm: Any, tmp_path: Path
) -> Iterator[Callable[[], WorkerProcess]]:
    """Start real workers on demand (again after a kill); all are stopped at the end."""
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        started.append(start_worker(redis_url, tmp_path / f"worker-{len(started)}.log"))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def celery_worker_process(celery_workers: Callable[[], WorkerProcess]) -> WorkerProcess:
    """One real prefork worker on the signing and maintenance queues."""
    return celery_workers()
