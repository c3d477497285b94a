"""Prometheus metrics for ``GET /metrics``, right however many processes serve and sign.

Two kinds of numbers, kept apart on purpose:

* **Events counted in the process where they happen**: ``http_requests_total`` (request
  middleware) and ``modelsign_signing_seconds`` (around the key backend's sign call). With
  several gunicorn workers and Celery pool processes, each process counts only its own
  events, so these use prometheus_client's multiprocess mode when
  ``PROMETHEUS_MULTIPROC_DIR`` is set (``deploy/gunicorn.conf.py`` and
  ``deploy/local/run.sh`` set it to ``$VAR_DIR/prometheus``): every process writes its
  values to a memory-mapped file there and a scrape sums the files of all processes,
  whichever gunicorn worker answers it. Without the variable (``runserver``, tests) they
  live in the one process.
* **State read from the database (and Redis) at scrape time**: signatures issued, pending
  approvals, waiting requests, quarantined signatures, days until each active key expires,
  queue depth. The database is the truth every process shares, so these are the same from
  any worker, survive restarts, and include work done by Celery on other hosts.
  ``modelsign_signatures_total`` is one of them: signatures are never deleted, so a count of
  rows is a proper counter, and it includes re-signatures made by the worker.

Nothing here may break signing or a request: recording a metric never raises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from celery.signals import worker_ready
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

# ``*_created`` series double the output and mean nothing summed over processes.
disable_created_metrics()

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered, by URL route name (never the raw path), method and status.",
    ["endpoint", "method", "status"],
)
SIGNING_SECONDS = Histogram(
    "modelsign_signing_seconds",
    "Time the key backend took to sign one DSSE payload (calls that returned a signature).",
    ["backend"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

#: The classic text format, which every Prometheus version reads (the names here need none
#: of the newer format's escaping, so the body is the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_failed_once: set[str] = set()


#: backend -> its labelled histogram: ``labels()`` costs as much as ``observe()`` itself.
_signing_by_backend: dict[str, Any] = {}


def observe_signing(backend: str, seconds: float) -> None:
    """Record one backend signature's latency; never raises (signing must not fail on it)."""
    try:
        child = _signing_by_backend.get(backend)
        if child is None:
            child = _signing_by_backend[backend] = SIGNING_SECONDS.labels(backend)
        child.observe(seconds)
    except Exception:
        _log_failure_once("modelsign_signing_seconds")


def count_request(endpoint: str, method: str, status: int) -> None:
    try:
        method = method if method in HTTP_METHODS else "other"
        HTTP_REQUESTS.labels(endpoint, method, str(status)).inc()
    except Exception:
        _log_failure_once("http_requests_total")


def _log_failure_once(metric: str) -> None:
    if metric not in _failed_once:
        _failed_once.add(metric)
        log.exception("could not record %s; further failures are not logged", metric)


# --- the exposition -----------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        MultiProcessCollector(registry, path)
    else:
        registry.register(_ProcessLocal())
    registry.register(ServiceStateCollector())
    return generate_latest(registry), CONTENT_TYPE


class _ProcessLocal:
    """The default registry (this process's metrics, process_* and python_* included)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class ServiceStateCollector:
    """Gauges (and the signature counter) computed from the database and Redis per scrape.

    A source that cannot be read is reported by ``modelsign_metrics_source_up{source}`` = 0
    and its metrics are left out, rather than failing the scrape or reporting stale zeros.
    """

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "modelsign_metrics_source_up",
            "Whether the source of the modelsign_* state metrics could be read (1) or not (0).",
            labels=["source"],
        )
        try:
            families = list(_database_families())
        except Exception as exc:
            log.warning("metrics: the database could not be read: %s", exc)
            families = []
        up.add_metric(["database"], 1 if families else 0)
        yield from families
        queues = _queue_depth()
        up.add_metric(["broker"], 1 if queues is not None else 0)
        if queues is not None:
            yield queues
        yield up


@worker_ready.connect(weak=False)
def _serve_worker_metrics(**_: Any) -> None:
    """A Celery worker in a pod of its own serves its pool's metrics (WORKER_METRICS_LISTEN).

    Only the multiprocess files (the signing latency): the state metrics come from the web
    processes' /metrics, so nothing is counted twice.
    """
    from django.conf import settings

    listen = settings.WORKER_METRICS_LISTEN
    path = multiprocess_dir()
    if listen is None or path is None:
        return
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path)
    host, port = listen
    start_http_server(port, addr=host, registry=registry)
    log.info("serving the worker's metrics on http://%s:%d/metrics", host, port)


def _database_families() -> Iterator[Metric]:
    from django.db.models import Count
    from django.utils import timezone

    from keys.models import KeyState, SigningKey
    from signing_service.models import RequestState, Signature, SignatureState, SigningRequest

    authorities = _policy_authorities()
    requests = SigningRequest.objects.values_list("authority")

    pending = _zeros(authorities) | dict(
        requests.filter(state=RequestState.PENDING_APPROVAL).annotate(n=Count("pk"))
    )
    yield _gauge(
        "modelsign_pending_approvals",
        "Signing requests waiting for approvals, by authority.",
        pending,
    )
    waiting = _zeros(authorities) | dict(
        requests.filter(state=RequestState.APPROVED)
        .exclude(waiting_reason="")
        .annotate(n=Count("pk"))
    )
    yield _gauge(
        "modelsign_waiting_requests",
        "Approved requests waiting for an active key or for their key backend, by authority.",
        waiting,
    )
    quarantined = _zeros(authorities) | dict(
        Signature.objects.filter(state=SignatureState.QUARANTINED)
        .values_list("request__authority")
        .annotate(n=Count("pk"))
    )
    yield _gauge(
        "modelsign_quarantined_signatures",
        "Signatures quarantined by a key revocation (not yet superseded), by authority.",
        quarantined,
    )
    yield _signatures_total(SigningKey, Signature)

    now = timezone.now()
    expiry = GaugeMetricFamily(
        "modelsign_key_expiry_days",
        "Days until each active key's validity ends (negative once it has ended); "
        "keys without an end are not listed. key is the key's fingerprint.",
        labels=["authority", "key"],
    )
    active = SigningKey.objects.filter(state=KeyState.ACTIVE, not_after__isnull=False)
    for key in active.order_by("authority").only("authority", "hint", "not_after"):
        assert key.not_after is not None
        days = (key.not_after - now).total_seconds() / 86400
        expiry.add_metric([key.authority, key.fingerprint], round(days, 3))
    yield expiry


def _signatures_total(signing_key: Any, signature: Any) -> Metric:
    """Rows of Signature by (authority, backend); per key first, which the key index covers."""
    from django.db.models import Count

    family = CounterMetricFamily(
        "modelsign_signatures",
        "Signatures issued (re-signatures included), by authority and key backend; "
        "counted in the database, so every process and host agrees.",
        labels=["authority", "backend"],
    )
    keys = {pk: (authority, backend) for pk, authority, backend in
            signing_key.objects.values_list("pk", "authority", "backend")}  # fmt: skip
    totals: dict[tuple[str, str], int] = {}
    per_key = (
        signature.objects.filter(key__isnull=False).values_list("key_id").annotate(n=Count("pk"))
    )
    for key_id, n in per_key:
        labels = keys.get(key_id, ("unknown", "unknown"))
        totals[labels] = totals.get(labels, 0) + n
    keyless = (
        signature.objects.filter(key__isnull=True)
        .values_list("request__authority")
        .annotate(n=Count("pk"))
    )
    for authority, n in keyless:
        totals[(authority, "sigstore")] = totals.get((authority, "sigstore"), 0) + n
    for labels, n in sorted(totals.items()):
        family.add_metric(list(labels), n)
    return family


def _queue_depth() -> GaugeMetricFamily | None:
    """LLEN of each Celery queue in Redis (kombu keeps priorities 3, 6, 9 in lists of their own)."""
    import redis
    from django.conf import settings

    timeout = settings.READYZ_TIMEOUT_SECONDS
    client = redis.Redis.from_url(
        settings.CELERY_BROKER_URL, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    queues = sorted(settings.CELERY_TASK_QUEUES)
    try:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for key in _priority_keys(queue):
                pipe.llen(key)
        lengths = pipe.execute()
    except Exception as exc:
        log.warning("metrics: the broker could not be read: %s", exc)
        return None
    finally:
        client.close()
    family = GaugeMetricFamily(
        "modelsign_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
    )
    per_queue = len(_priority_keys(""))
    for i, queue in enumerate(queues):
        family.add_metric([queue], sum(lengths[i * per_queue : (i + 1) * per_queue]))
    return family


def _priority_keys(queue: str) -> list[str]:
    # kombu.transport.redis: priority 0 is the queue's own key, others are "<queue>\x06\x16<n>".
    return [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]


def _policy_authorities() -> list[str]:
    from signing_service.policy import current_policy

    try:
        return sorted(current_policy().authorities)
    except Exception:  # the gauges still report what the database holds
        return []


def _zeros(authorities: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(authorities, 0)


def _gauge(name: str, documentation: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["authority"])
    for authority, value in sorted(values.items()):
        family.add_metric([authority], value)
    return family
