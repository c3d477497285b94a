"""Liveness, readiness, Prometheus metrics and request ids that follow a request into Celery.

Real components throughout: SoftHSM keys, a real ``redis-server``, real ``celery worker`` and
``gunicorn`` subprocesses (for the request id in worker logs and multiprocess metrics).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from keys import registry
from keys.backends.pkcs11 import reset_process_state
from keys.lifecycle import register_key
from keys.models import SigningKey
from keys.revocation import revoke
from signing_service import health, logs
from signing_service.models import RequestState, SigningRequest
from tests.fixtures_service import authed, request_body
from tests.redis_fixtures import ROOT, WorkerProcess, _stop, free_port, worker_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _fresh_probes() -> Iterator[None]:
    health.reset()
    yield
    health.reset()


def scrape(client: Client | None = None, **headers: str) -> Samples:
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.content.decode())


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def readyz() -> tuple[int, dict[str, Any]]:
    response = Client().get("/readyz")
    return response.status_code, response.json()


# --- /healthz and /readyz -----------------------------------------------------------------


@pytest.mark.django_db
def test_healthz_answers_without_touching_any_dependency(
    settings: Any, django_assert_num_queries: Any
) -> None:
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    with django_assert_num_queries(0):
        response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.softhsm
def test_readyz_is_200_with_every_check_when_all_is_up(
    settings: Any, redis_url: str, active_keys: dict[str, SigningKey]
) -> None:
    settings.CELERY_BROKER_URL = redis_url
    status, body = readyz()
    assert status == 200, body
    assert body["status"] == "ok" and body["failed"] == []
    assert set(body["checks"]) == {
        "database",
        "broker",
        "policy",
        "key_backend:development",
        "key_backend:production",
        "key_backend:staging",
    }
    assert all(check["ok"] for check in body["checks"].values()), body
    assert "logged in" in body["checks"]["key_backend:staging"]["detail"]


@pytest.mark.softhsm
def test_readyz_is_503_naming_the_broker_when_it_is_down(
    settings: Any, active_keys: dict[str, SigningKey]
) -> None:
    port = free_port()
    settings.CELERY_BROKER_URL = f"redis://:secret-pw@127.0.0.1:{port}/0"
    status, body = readyz()
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["failed"] == ["broker"]
    detail = body["checks"]["broker"]["detail"]
    assert f"127.0.0.1:{port}" in detail and "secret-pw" not in detail
    assert body["checks"]["database"]["ok"] and body["checks"]["key_backend:staging"]["ok"]


@pytest.fixture
def staging_key_with_wrong_pin(
    hsm: Any, db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> SigningKey:
    """Active keys for every authority; staging's on a token of its own, whose PIN file is
    then replaced by a wrong PIN (as after a botched secret rotation)."""
    for name in ("development", "production"):
        backend = registry.pkcs11_backend(name)
        generated = backend.generate(f"{name}-{secrets.token_hex(4)}")
        register_key(name, backend, generated, algorithm="ECDSA-P256",
                     validity=timedelta(days=365), actor="tests", activate=True)  # fmt: skip
    token = hsm.new_token()
    backend = token.backend()
    generated = backend.generate(f"staging-{secrets.token_hex(4)}")
    key = register_key("staging", backend, generated, algorithm="ECDSA-P256",
                       validity=timedelta(days=365), actor="tests", activate=True)  # fmt: skip
    wrong = tmp_path / "staging-wrong.pin"
    wrong.write_text("0000-not-the-pin\n")
    wrong.chmod(0o600)
    monkeypatch.setenv("PKCS11_TOKEN_STAGING", token.token_label)
    monkeypatch.setenv("PKCS11_PIN_FILE_STAGING", str(wrong))
    reset_process_state()  # log out: the next login on that token uses the wrong PIN
    registry.reset()
    return key


@pytest.mark.softhsm
def test_readyz_is_503_naming_the_authority_whose_key_backend_is_down(
    settings: Any, redis_url: str, staging_key_with_wrong_pin: SigningKey
) -> None:
    settings.CELERY_BROKER_URL = redis_url
    status, body = readyz()
    assert status == 503, body
    assert body["failed"] == ["key_backend:staging"]
    assert "PIN" in body["checks"]["key_backend:staging"]["detail"]
    assert "rejected" in body["checks"]["key_backend:staging"]["detail"]
    assert body["checks"]["key_backend:production"]["ok"]
    assert body["checks"]["broker"]["ok"] and body["checks"]["database"]["ok"]


@pytest.mark.softhsm
def test_readyz_reuses_a_backend_answer_for_the_cache_period(
    settings: Any, redis_url: str, active_keys: dict[str, SigningKey], monkeypatch: Any
) -> None:
    """Probes never hammer the HSM: one health() per backend per cache period."""
    from keys.backends.pkcs11 import Pkcs11Backend

    calls: list[str] = []
    real = Pkcs11Backend.health
    monkeypatch.setattr(Pkcs11Backend, "health", lambda self: calls.append("x") or real(self))
    settings.CELERY_BROKER_URL = redis_url
    settings.READYZ_CACHE_SECONDS = 300
    for _ in range(5):
        assert readyz()[0] == 200
    assert len(calls) == 1  # three authorities, one token: one backend object, one call
    settings.READYZ_CACHE_SECONDS = 0
    assert readyz()[0] == 200
    assert len(calls) == 2


def test_readyz_is_503_naming_the_database_when_it_is_unreachable(tmp_path: Path) -> None:
    """A separate process whose DATABASE_URL points at a port where nothing listens."""
    script = (
        "import django, json; django.setup()\n"
        "from django.test import Client\n"
        "r = Client(HTTP_HOST='localhost').get('/readyz')\n"
        "print(json.dumps({'status': r.status_code, 'body': r.json()}))\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "signing_service.settings",
        "DATABASE_URL": f"postgres://modelsign:pw@127.0.0.1:{free_port()}/modelsign",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "VAR_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["status"] == 503
    body = answer["body"]
    assert {"database", "broker", "key_backends"} <= set(body["failed"])
    assert "postgresql" in body["checks"]["database"]["detail"]
    assert body["checks"]["key_backends"]["detail"] == "not checked: the database is unavailable"
    assert body["checks"]["policy"]["ok"]


# --- /metrics -------------------------------------------------------------------------------


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_signing_request_counts_its_http_request_signature_and_backend_latency(
    active_keys: dict[str, SigningKey], api: Any, issue_token: Callable[..., str]
) -> None:
    before = scrape()
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json"
    )
    assert response.status_code == 201 and response.json()["state"] == RequestState.SIGNED
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"endpoint": "api-v1:signing-requests", "method": "POST", "status": "201"}
    assert delta("http_requests_total", **route) == 1
    assert delta("modelsign_signing_seconds_count", backend="pkcs11") == 1
    assert delta("modelsign_signing_seconds_sum", backend="pkcs11") > 0
    assert delta("modelsign_signing_seconds_bucket", backend="pkcs11", le="+Inf") == 1
    assert value(after, "modelsign_signatures_total", authority="staging", backend="pkcs11") == 1
    assert value(after, "modelsign_signatures_total", authority="production", backend="pkcs11") == 0


@pytest.mark.softhsm
@pytest.mark.django_db
def test_request_labels_are_route_names_never_raw_paths(
    active_keys: dict[str, SigningKey], api: Any, issue_token: Callable[..., str]
) -> None:
    client = authed(api, issue_token())
    created = client.post("/api/v1/signing-requests/", request_body(), format="json").json()
    assert client.get(f"/api/v1/signing-requests/{created['id']}/").status_code == 200
    assert Client().get(f"/no/such/{created['id']}").status_code == 404
    samples = scrape()
    assert value(samples, "http_requests_total", endpoint="api-v1:signing-request",
                 method="GET", status="200") >= 1  # fmt: skip
    assert value(samples, "http_requests_total", endpoint="unrouted",
                 method="GET", status="404") >= 1  # fmt: skip
    labels = {v for (_, sample_labels) in samples for _, v in sample_labels}
    assert not any(created["id"] in label for label in labels)


@pytest.mark.softhsm
@pytest.mark.django_db
def test_gauges_reflect_the_database(
    active_keys: dict[str, SigningKey],
    pending_request: Callable[..., Any],
    api: Any,
    issue_token: Callable[..., str],
) -> None:
    pending_request()
    pending_request(version="1.0.1")
    client = authed(api, issue_token(authorities=("staging", "development")))
    signed = [
        client.post("/api/v1/signing-requests/", request_body(version=f"2.0.{i}"), format="json")
        for i in range(3)
    ]
    assert all(r.json()["state"] == RequestState.SIGNED for r in signed)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    for name in ("staging", "development"):  # development: a new request waits for a new key
        revoke(active_keys[name].pk, reason="compromised", effective_at=an_hour_ago, actor="ir")
    waiting = client.post(
        "/api/v1/signing-requests/", request_body(environment="development"), format="json"
    )
    assert waiting.json()["state"] == RequestState.APPROVED, waiting.json()

    samples = scrape()
    assert value(samples, "modelsign_pending_approvals", authority="production") == 2
    assert value(samples, "modelsign_pending_approvals", authority="staging") == 0
    assert value(samples, "modelsign_quarantined_signatures", authority="staging") == 3
    assert value(samples, "modelsign_quarantined_signatures", authority="production") == 0
    assert value(samples, "modelsign_waiting_requests", authority="development") == 1
    assert value(samples, "modelsign_signatures_total", authority="staging", backend="pkcs11") == 3
    production = active_keys["production"]
    days = value(
        samples, "modelsign_key_expiry_days", authority="production", key=production.fingerprint
    )
    assert 364.9 < days <= 365
    expiring = {dict(labels)["key"] for (name, labels) in samples
                if name == "modelsign_key_expiry_days"}  # fmt: skip
    assert expiring == {production.fingerprint}  # revoked keys are not listed
    assert value(samples, "modelsign_metrics_source_up", source="database") == 1


@pytest.mark.softhsm
def test_queue_depth_counts_messages_waiting_in_redis(
    settings: Any,
    celery_app_for_tests: Any,
    redis_url: str,
    active_keys: dict[str, SigningKey],
    api: Any,
    issue_token: Callable[..., str],
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.SIGNING_MODE = "worker"
    settings.CELERY_BROKER_URL = redis_url
    client = authed(api, issue_token())
    with django_capture_on_commit_callbacks(execute=True):
        for i in range(2):
            body = request_body(version=f"3.0.{i}")
            assert client.post("/api/v1/signing-requests/", body, format="json").status_code == 201
    samples = scrape()
    assert value(samples, "modelsign_queue_depth", queue="signing") == 2
    assert value(samples, "modelsign_queue_depth", queue="maintenance") == 0
    assert value(samples, "modelsign_metrics_source_up", source="broker") == 1


@pytest.mark.django_db
def test_metrics_report_an_unreachable_broker_instead_of_failing(settings: Any) -> None:
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"
    samples = scrape()
    assert value(samples, "modelsign_metrics_source_up", source="broker") == 0
    assert value(samples, "modelsign_metrics_source_up", source="database") == 1
    assert not any(name == "modelsign_queue_depth" for name, _ in samples)


@pytest.mark.django_db
def test_metrics_need_the_bearer_token_when_one_is_set(settings: Any) -> None:
    settings.METRICS_TOKEN = "scrape-" + "x" * 24
    refused = Client().get("/metrics")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scrape(HTTP_AUTHORIZATION=f"Bearer {settings.METRICS_TOKEN}")  # asserts 200
    remote = Client(REMOTE_ADDR="10.1.2.3")
    ok = remote.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.METRICS_TOKEN}")
    assert ok.status_code == 200


@pytest.mark.django_db
def test_metrics_without_a_token_answer_only_direct_loopback_connections(settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    scrape()  # the test client connects from 127.0.0.1
    remote = Client(REMOTE_ADDR="10.1.2.3").get("/metrics")
    assert remote.status_code == 403
    assert b"METRICS_TOKEN" in remote.content
    proxied = Client().get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert proxied.status_code == 403  # a proxy on the same host must not publish them


# --- request ids and JSON logs -------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the root logger writes, through the same formatter and filter as LOG_FORMAT=json."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RequestContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.django_db
def test_json_log_lines_carry_the_incoming_request_id(json_log: io.StringIO) -> None:
    response = Client().get("/no/such/page", HTTP_X_REQUEST_ID="ci-run-4711.attempt-2")
    assert response.status_code == 404
    assert response["X-Request-ID"] == "ci-run-4711.attempt-2"
    lines = json_lines(json_log.getvalue())
    not_found = [line for line in lines if line["message"] == "Not Found: /no/such/page"]
    assert len(not_found) == 1, lines
    line = not_found[0]
    assert line["request_id"] == "ci-run-4711.attempt-2"
    assert line["level"] == "WARNING" and line["logger"] == "django.request"
    assert line["status_code"] == 404  # an ``extra`` of Django's record
    assert line["time"].endswith("+00:00")
    logging.getLogger("after").warning("outside any request")
    assert json_lines(json_log.getvalue())[-1]["request_id"] is None


@pytest.mark.parametrize(
    "incoming", ["", "has space", "line\nbreak", "x" * 129, "-leading-dash", "semi;colon"]
)
@pytest.mark.django_db
def test_an_insane_incoming_request_id_is_replaced(incoming: str) -> None:
    response = Client().get("/healthz", HTTP_X_REQUEST_ID=incoming)
    issued = response["X-Request-ID"]
    assert issued != incoming
    assert len(issued) == 32 and int(issued, 16) >= 0


@pytest.mark.django_db
def test_every_request_without_an_id_gets_a_fresh_one() -> None:
    first, second = (Client().get("/healthz")["X-Request-ID"] for _ in range(2))
    assert first != second


def test_log_lines_with_an_exception_stay_one_json_line(json_log: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("tests").exception("failed", extra={"request": "r-1", "n": 3})
    (line,) = json_lines(json_log.getvalue())
    assert line["message"] == "failed" and line["n"] == 3 and line["request"] == "r-1"
    assert "ValueError: boom" in line["exc"]


def wait_for(done: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def worker_json_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = []
    for raw in worker.output().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))  # every structured line must parse
    return lines


@pytest.mark.softhsm
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_request_id_follows_the_request_into_its_celery_task(
    settings: Any,
    celery_workers: Callable[[], WorkerProcess],
    active_keys: dict[str, SigningKey],
    api: Any,
    issue_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "json")  # the worker's settings read it
    worker = celery_workers()
    settings.SIGNING_MODE = "worker"
    request_id = f"ci-{secrets.token_hex(8)}"
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json", HTTP_X_REQUEST_ID=request_id
    )
    assert response.status_code == 201 and response["X-Request-ID"] == request_id
    pk = response.json()["id"]
    wait_for(
        lambda: SigningRequest.objects.get(pk=pk).state == RequestState.SIGNED,
        f"the worker to sign\n{worker.output()}",
    )

    def task_lines() -> list[dict[str, Any]]:
        return [line for line in worker_json_lines(worker) if line.get("request_id") == request_id]

    wait_for(lambda: bool(task_lines()), f"a worker log line with the id\n{worker.output()}")
    line = task_lines()[0]
    assert line["task_name"] == "worker.tasks.signing.sign_request"
    assert line["task_id"]
    # Lines of other tasks and of the worker itself do not borrow the id.
    others = [line for line in worker_json_lines(worker) if line.get("request_id") != request_id]
    assert all(line.get("task_name") != "worker.tasks.signing.sign_request" for line in others)


# --- several processes: gunicorn workers and the Celery pool --------------------------------


def call(
    port: int, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, bytes]:
    """One request on a new connection (so the kernel may hand it to either worker)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture
def gunicorn_two_workers(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[int]:
    """gunicorn with two sync workers and the test's database, broker and HSM settings."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))  # celery workers too
    port = free_port()
    env = {**worker_env(redis_url), "SIGNING_MODE": "worker", "WEB_CONCURRENCY": "2"}
    log = tmp_path / "gunicorn.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "signing_service.wsgi:application",
         "-c", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, start_new_session=True, stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: _answers(port, proc), f"gunicorn\n{log.read_text()}")
        yield port
    finally:
        _stop(proc, timeout=15)


def _answers(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "gunicorn exited"
    try:
        return call(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


@pytest.mark.softhsm
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_metrics_add_up_over_gunicorn_workers_and_the_celery_pool(
    gunicorn_two_workers: int,
    celery_workers: Callable[[], WorkerProcess],
    active_keys: dict[str, SigningKey],
    issue_token: Callable[..., str],
) -> None:
    port = gunicorn_two_workers
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    worker = celery_workers()
    status, created = call(
        port, "POST", "/api/v1/signing-requests/", json.dumps(request_body()).encode(),
        **{"Content-Type": "application/json", "Authorization": f"Bearer {issue_token()}"},
    )  # fmt: skip
    assert status == 201, created
    answer = json.loads(created)
    wait_for(
        lambda: SigningRequest.objects.get(pk=answer["id"]).state == RequestState.SIGNED,
        f"the worker to sign\n{worker.output()}",
    )
    # Until both gunicorn workers have answered some: the kernel picks who accepts. Only
    # gunicorn workers count HTTP requests, so each counter file is one of them.
    sent = 1  # the /healthz that found gunicorn up
    while len(list(metrics_dir.glob("counter_*.db"))) < 2:
        assert sent < 1000, "one gunicorn worker answered everything"
        assert call(port, "GET", "/healthz")[0] == 200
        sent += 1
    for _ in range(4):  # whichever worker answers the scrape, the totals are the same
        status, text = call(port, "GET", "/metrics")
        assert status == 200, text
        samples = parse(text.decode())
        healthz = value(samples, "http_requests_total", endpoint="healthz", method="GET",
                        status="200")  # fmt: skip
        assert healthz == sent
        posted = value(samples, "http_requests_total", endpoint="api-v1:signing-requests",
                       method="POST", status="201")  # fmt: skip
        assert posted == 1
        # Signed in a Celery pool process, counted from its file in the shared directory.
        assert value(samples, "modelsign_signing_seconds_count", backend="pkcs11") == 1
        assert value(samples, "modelsign_signatures_total", authority="staging",
                     backend="pkcs11") == 1  # fmt: skip


@pytest.mark.softhsm
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_in_a_pod_of_its_own_serves_its_signing_latencies(
    settings: Any,
    celery_workers: Callable[[], WorkerProcess],
    active_keys: dict[str, SigningKey],
    api: Any,
    issue_token: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "worker-metrics"))
    monkeypatch.setenv("WORKER_METRICS_LISTEN", f"127.0.0.1:{port}")
    worker = celery_workers()
    settings.SIGNING_MODE = "worker"
    response = authed(api, issue_token()).post(
        "/api/v1/signing-requests/", request_body(), format="json"
    )
    assert response.status_code == 201
    wait_for(
        lambda: SigningRequest.objects.get(pk=response.json()["id"]).state == RequestState.SIGNED,
        f"the worker to sign\n{worker.output()}",
    )
    status, text = call(port, "GET", "/metrics")
    assert status == 200, text
    samples = parse(text.decode())
    assert value(samples, "modelsign_signing_seconds_count", backend="pkcs11") == 1
    # State metrics come from the web's /metrics only: never counted twice.
    assert not any(name.startswith("modelsign_signatures") for name, _ in samples)
    assert not any(name.startswith("http_requests") for name, _ in samples)
