"""Faults around the worker: Redis lost with work queued, and the HSM unavailable.

Real processes throughout: ``redis-server``, ``celery worker`` subprocesses, SoftHSM tokens.
The database is the source of truth; Redis only carries hints, so losing it loses nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keys import registry
from keys.lifecycle import register_key
from keys.models import SigningKey
from signing_service import audit, bundle, signing
from signing_service.manifest import DEFAULT_IGNORE_PATHS, Resource
from signing_service.models import AuditEntry, RequestState, Signature, SigningRequest
from signing_service.policy import current_policy
from tests.fixtures_service import CI_IDENTITY
from tests.redis_fixtures import _start_redis, _stop, _use_broker, start_worker
from tests.test_worker_tasks import all_signed, approved_request, signature_counts, wait_for
from worker.tasks.signing import enqueue_signing, reconcile

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]


def new_staging_key() -> SigningKey:
    """A new P-256 key generated on the staging token, registered and activated."""
    backend = registry.pkcs11_backend("staging")
    generated = backend.generate(f"staging-{secrets.token_hex(4)}", "ECDSA-P256")
    return register_key(
        "staging", backend, generated, algorithm="ECDSA-P256",
        validity=timedelta(days=90), actor="tests", activate=True,
    )  # fmt: skip


# --- Redis restarted empty ---------------------------------------------------------------


class RestartableRedis:
    """A private redis-server on a fixed port that can be killed and started again, empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc, self.port = _start_redis(workdir)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def queued(self, queue: str = "signing") -> int:
        import redis

        return int(redis.Redis.from_url(self.url).llen(queue))

    def restart_empty(self) -> None:
        self.proc.kill()  # kill -9: whatever it held is gone (it persists nothing)
        self.proc.wait(5)
        self.proc = subprocess.Popen(
            ["/usr/bin/redis-server", "--save", "", "--appendonly", "no",
             "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir)],
            stdout=(self.workdir / "redis-2.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: self._pings(), timeout=10, what="redis-server to come back")

    def _pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url).ping())
        except redis.ConnectionError:
            return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    from worker.celery import app

    server = RestartableRedis(tmp_path)
    previous = app.conf.broker_url
    _use_broker(app, server.url)
    try:
        yield server
    finally:
        _use_broker(app, previous)
        _stop(server.proc, timeout=5)


def test_redis_restarted_empty_with_500_queued_loses_no_request(
    own_redis: RestartableRedis,
    active_keys: Any,
    tmp_path: Path,
    settings: Any,
) -> None:
    pks = [approved_request(n).pk for n in range(500)]
    for pk in pks:
        enqueue_signing(pk)  # no worker yet: all 500 sit in Redis
    assert own_redis.queued() == 500

    own_redis.restart_empty()
    assert own_redis.queued() == 0  # every message is gone; the rows still say "approved"

    worker = start_worker(own_redis.url, tmp_path / "worker.log")
    try:
        settings.RECONCILE_AFTER_SECONDS = 0
        assert reconcile() == {"reclaimed": 0, "requeued": 500}
        wait_for(all_signed(pks), timeout=300, what=f"500 signed\n{worker.output()[-3000:]}")
    finally:
        worker.stop()
    assert signature_counts(pks) == dict.fromkeys(pks, 1)  # 0 lost, 0 duplicates
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)


# --- HSM unavailable ---------------------------------------------------------------------


@pytest.fixture
def staging_on_own_token(
    hsm: Any, active_keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, Any]:
    """Staging gets a token of its own (as in the local stack), with its own PIN file."""
    token = hsm.new_token()
    pin_file = tmp_path / "staging.pin"
    pin_file.write_text(token.user_pin + "\n")
    pin_file.chmod(0o600)
    monkeypatch.setenv("PKCS11_TOKEN_STAGING", token.token_label)
    monkeypatch.setenv("PKCS11_PIN_FILE_STAGING", str(pin_file))
    registry.reset()
    signing._usable_checked.clear()
    old = active_keys["staging"]
    from keys.lifecycle import transition

    transition(old.pk, "transition", actor="tests")
    key = new_staging_key()
    return {"token": token, "pin_file": pin_file, "key": key, "keys": active_keys}


def development_request(n: int) -> SigningRequest:
    """An approved request for the development authority (another key, on another token)."""
    principal = signing.Principal(CI_IDENTITY, frozenset({"development"}))
    sub = signing.Submission(
        model="dev-model",
        version=f"0.{n}",
        environment="development",
        resources=[
            Resource(
                name="weights.bin", algorithm="sha256", digest=hashlib.sha256(b"%d" % n).hexdigest()
            )
        ],
        ignore_paths=list(DEFAULT_IGNORE_PATHS),
        ci={},
    )
    authority = current_policy().authority("development")
    assert authority is not None
    req = signing._create(principal, authority, sub, signing.body_digest(sub), None)
    assert req.state == RequestState.APPROVED
    return req


def _wrong_pin(ctx: dict[str, Any]) -> Callable[[], None]:
    good = ctx["pin_file"].read_text()
    ctx["pin_file"].write_text(f"wrong-{secrets.token_hex(4)}\n")
    return lambda: ctx["pin_file"].write_text(good)  # the operator fixes the PIN file


def _token_gone(ctx: dict[str, Any]) -> Callable[[], None]:
    """The staging HSM partition is not there (unplugged, being restored from backup)."""
    tokendir = Path(
        next(
            line.split("=", 1)[1].strip()
            for line in ctx["token"].conf_path.read_text().splitlines()
            if line.strip().startswith("directories.tokendir")
        )
    )
    label = ctx["token"].token_label.encode()
    [directory] = [d for d in tokendir.iterdir() if label in (d / "token.object").read_bytes()]
    away = tokendir.parent / f"{directory.name}.away"  # SoftHSM loads any dir in tokendir
    directory.rename(away)
    return lambda: away.rename(directory)  # it comes back


OUTAGES: dict[str, tuple[Callable[[dict[str, Any]], Callable[[], None]], str]] = {
    "wrong PIN": (_wrong_pin, "PIN"),
    "token missing": (_token_gone, "not found"),
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_hsm_unavailable_requests_wait_no_other_key_signs_and_recover(
    celery_app_for_tests: Any,
    redis_url: str,
    staging_on_own_token: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    settings: Any,
    outage: str,
) -> None:
    break_it, reason_part = OUTAGES[outage]
    pin = staging_on_own_token["token"].user_pin
    repair = break_it(staging_on_own_token)

    waiting = [approved_request(n).pk for n in range(5)]
    others = [development_request(n).pk for n in range(3)]
    worker = start_worker(redis_url, tmp_path / "worker-down.log")
    try:
        for pk in waiting + others:
            enqueue_signing(pk)
        wait_for(all_signed(others), what=f"development signed\n{worker.output()[-3000:]}")
        wait_for(
            lambda: all(
                r.state == RequestState.APPROVED and reason_part in r.waiting_reason
                for r in SigningRequest.objects.filter(pk__in=waiting)
            ),
            what=f"staging requests waiting\n{worker.output()[-3000:]}",
        )
    finally:
        worker.stop()
    # No other key stepped in: staging has no signature at all, development only its own.
    assert not Signature.objects.filter(request__in=waiting).exists()
    dev_key = staging_on_own_token["keys"]["development"]
    assert set(Signature.objects.filter(request__in=others).values_list("key", flat=True)) == {
        dev_key.pk
    }
    reason = SigningRequest.objects.get(pk=waiting[0]).waiting_reason
    assert reason.startswith("the staging key backend is unavailable: ")
    assert pin not in reason  # the reason never shows a PIN
    assert AuditEntry.objects.filter(action="signing_request.waiting").count() == len(waiting)

    # The operator fixes it and restarts the worker; the reconciler picks the waiting
    # requests up again.
    repair()
    worker = start_worker(redis_url, tmp_path / "worker-up.log")
    try:
        settings.RECONCILE_AFTER_SECONDS = 0
        reconcile()
        wait_for(all_signed(waiting), what=f"staging signed\n{worker.output()[-3000:]}")
    finally:
        worker.stop()
    key = staging_on_own_token["key"]
    for sig in Signature.objects.filter(request__in=waiting):
        assert sig.key_id == key.pk
        assert bundle.verify_bundle(sig.bundle, bundle.load_public_key(key.public_key_pem))
    assert signature_counts(waiting) == dict.fromkeys(waiting, 1)
    assert not SigningRequest.objects.filter(pk__in=waiting).exclude(waiting_reason="").exists()


def test_a_request_that_kills_its_worker_every_time_fails_after_the_attempt_cap(
    celery_app_for_tests: Any, active_keys: Any, settings: Any
) -> None:
    from worker.tasks.signing import MAX_SIGN_ATTEMPTS

    settings.STUCK_SIGNING_SECONDS = 0
    req = approved_request()
    for attempt in range(1, MAX_SIGN_ATTEMPTS + 1):
        # A signer claimed it and died (kill -9 leaves exactly this row behind).
        SigningRequest.objects.filter(pk=req.pk).update(state=RequestState.SIGNING)
        SigningRequest.objects.filter(pk=req.pk).update(
            updated_at=SigningRequest.objects.get(pk=req.pk).updated_at - timedelta(seconds=5)
        )
        assert reconcile()["reclaimed"] == 1
        req.refresh_from_db()
        if attempt < MAX_SIGN_ATTEMPTS:
            assert req.state == RequestState.APPROVED and req.sign_attempts == attempt
    assert req.state == RequestState.FAILED
    assert f"gave up after {MAX_SIGN_ATTEMPTS} attempts" in req.failure_reason
    assert not Signature.objects.filter(request=req).exists()


def test_requests_waiting_for_a_key_are_signed_as_soon_as_a_new_key_is_active(
    celery_app_for_tests: Any,
    redis_url: str,
    active_keys: dict[str, SigningKey],
    tmp_path: Path,
    settings: Any,
) -> None:
    from keys.lifecycle import transition

    settings.SIGNING_MODE = "worker"
    transition(active_keys["staging"].pk, "revoked", actor="tests", reason="compromised")
    waiting = [approved_request(n).pk for n in range(3)]
    worker = start_worker(redis_url, tmp_path / "worker.log")
    try:
        for pk in waiting:
            enqueue_signing(pk)
        wait_for(
            lambda: all(
                "no active signing key" in r.waiting_reason
                for r in SigningRequest.objects.filter(pk__in=waiting)
            ),
            what=f"requests waiting for a key\n{worker.output()[-3000:]}",
        )
        assert not Signature.objects.filter(request__in=waiting).exists()
        new = new_staging_key()
        # No reconcile run: the activation itself hands the waiting requests to the worker.
        wait_for(all_signed(waiting), what=f"signed by the new key\n{worker.output()[-3000:]}")
    finally:
        worker.stop()
    assert set(Signature.objects.filter(request__in=waiting).values_list("key", flat=True)) == {
        new.pk
    }


def test_inline_mode_signs_waiting_requests_in_the_process_that_activates_the_key(
    active_keys: dict[str, SigningKey], settings: Any
) -> None:
    """A ceremony run from a shell (``manage.py key_ceremony``, inline mode, no broker) signs
    the requests that waited for a key itself, instead of leaving them to the next reconcile."""
    from keys.lifecycle import transition

    settings.SIGNING_MODE = "inline"
    transition(active_keys["staging"].pk, "revoked", actor="tests", reason="compromised")
    waiting = [approved_request(n).pk for n in range(3)]
    for pk in waiting:
        assert signing.sign(pk).state == RequestState.APPROVED  # no key: it waits
    assert all(
        "no active signing key" in r.waiting_reason
        for r in SigningRequest.objects.filter(pk__in=waiting)
    )
    new = new_staging_key()
    assert all_signed(waiting)()
    assert set(Signature.objects.filter(request__in=waiting).values_list("key", flat=True)) == {
        new.pk
    }
    assert not SigningRequest.objects.filter(pk__in=waiting).exclude(waiting_reason="").exists()
