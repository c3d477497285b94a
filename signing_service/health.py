"""Readiness checks for ``GET /readyz``: database, broker, policy, each active key's backend.

Every check answers within ``READYZ_TIMEOUT_SECONDS``. Key backends are probed in daemon
threads and their answers are cached for ``READYZ_CACHE_SECONDS``: however often load
balancers and kubelets ask, a backend sees at most one ``health()`` call per cache period
per process, and a backend that hangs has at most one call in flight (later probes wait on
that call instead of starting another), so probes never pile up on an HSM or on Vault.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection

from keys.backends.base import Health, KeyBackend


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def run_checks() -> list[Check]:
    """All readiness checks, in a stable order; never raises."""
    deadline = time.monotonic() + settings.READYZ_TIMEOUT_SECONDS
    database = check_database()
    checks = [database, check_broker(), check_policy()]
    if database.ok:
        checks += check_key_backends(deadline)
    else:
        checks.append(Check("key_backends", False, "not checked: the database is unavailable"))
    return checks


def check_database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any driver error means "not ready", with its message
        return Check("database", False, f"{connection.vendor}: {_describe(exc)}")
    return Check("database", True, f"{connection.vendor} answered")


def check_broker() -> Check:
    """PING the Redis broker with a short connect and read timeout."""
    import redis

    timeout = settings.READYZ_TIMEOUT_SECONDS
    url = settings.CELERY_BROKER_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    where = _redact(url)
    try:
        client.ping()
    except Exception as exc:  # connection refused, timeout, auth: all "not ready"
        return Check("broker", False, f"Redis at {where}: {_describe(exc)}")
    finally:
        client.close()
    return Check("broker", True, f"Redis at {where} answered PING")


def check_policy() -> Check:
    from signing_service.policy import current_policy

    try:
        policy = current_policy()
    except Exception as exc:  # an unreadable or invalid policy file
        return Check("policy", False, _describe(exc))
    names = ", ".join(sorted(policy.authorities)) or "none"
    return Check("policy", True, f"loaded, digest {policy.digest[:12]}, authorities: {names}")


def check_key_backends(deadline: float) -> list[Check]:
    """One check per authority with an active key, named ``key_backend:<authority>``."""
    from keys.models import KeyState, SigningKey
    from keys.registry import backend_for

    pending: list[tuple[str, _Probe | Check]] = []
    probes: dict[int, _Probe] = {}  # authorities sharing a backend share its one probe
    for key in SigningKey.objects.filter(state=KeyState.ACTIVE).order_by("authority"):
        name = f"key_backend:{key.authority}"
        try:
            backend = backend_for(key)
        except Exception as exc:  # e.g. a missing PIN file: the backend cannot even be built
            pending.append((name, Check(name, False, f"{key.backend}: {_describe(exc)}")))
            continue
        if id(backend) not in probes:
            probes[id(backend)] = _probe(backend)
        pending.append((name, probes[id(backend)]))
    checks = []
    for name, probe in pending:
        if isinstance(probe, Check):
            checks.append(probe)
            continue
        health = probe.wait(max(0.0, deadline - time.monotonic()))
        checks.append(Check(name, health.ok, f"{probe.backend.name}: {health.detail}"))
    return checks


# --- cached, time-limited backend probes -------------------------------------------------


@dataclass(eq=False)
class _Probe:
    backend: KeyBackend
    done: threading.Event = field(default_factory=threading.Event)
    result: Health | None = None
    finished_at: float = 0.0

    def run(self) -> None:
        try:
            self.result = self.backend.health()
        except Exception as exc:  # health() must not raise, but a probe must never die
            self.result = Health(ok=False, detail=f"health check raised {_describe(exc)}")
        self.finished_at = time.monotonic()
        self.done.set()

    def wait(self, timeout: float) -> Health:
        if not self.done.wait(timeout) or self.result is None:
            return Health(
                ok=False,
                detail=f"no answer within {settings.READYZ_TIMEOUT_SECONDS}s "
                "(the check goes on in the background; later probes wait for it)",
            )
        return self.result


_lock = threading.Lock()
#: id(backend) -> its latest probe; the probe holds the backend, so the id is not reused.
_probes: dict[int, _Probe] = {}


def _probe(backend: KeyBackend) -> _Probe:
    """The backend's cached probe, or a new one started now if the cached one is stale."""
    ttl = settings.READYZ_CACHE_SECONDS
    with _lock:
        probe = _probes.get(id(backend))
        if probe is not None and (
            not probe.done.is_set() or time.monotonic() - probe.finished_at < ttl
        ):
            return probe
        probe = _probes[id(backend)] = _Probe(backend)
    threading.Thread(target=probe.run, name="readyz-backend-health", daemon=True).start()
    return probe


def reset() -> None:
    """Forget cached probe results (tests, and after the key registry is reset)."""
    with _lock:
        _probes.clear()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _redact(url: str) -> str:
    """The broker URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
