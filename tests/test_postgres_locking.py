"""On PostgreSQL, concurrent decisions, retries, confirmations and signings really wait.

SQLite (the default test database) takes one write lock for the whole database at BEGIN, so
writers queue before they read anything and the row locks, conditional updates and unique
constraints the service relies on are never contended. Here this test's transaction holds
its locks open while the same call runs on a second connection in another thread; each test
checks that the second call waits for one of *our* locks (``pg_blocking_pids``) and that,
once we commit, it sees our work and keeps the invariant: one approval counted once, one
request per Idempotency-Key, one key per ceremony, one signature per request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pytest
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from approvals.services import decide
from keys import ceremonies
from keys.models import CeremonyState, KeyState, SigningKey
from keys.revocation import revoke
from signing_service.models import Signature, SigningRequest
from signing_service.signing import SigningRefused, sign
from tests.fixtures_service import authed, request_body

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="row-level lock waits need PostgreSQL (SQLite locks the whole file at BEGIN)",
    ),
]
T = TypeVar("T")
URL = "/api/v1/signing-requests/"


class Waiting(Generic[T]):
    """``call`` running on its own connection in a thread, waiting behind our transaction."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._pid: queue.Queue[int] = queue.Queue()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()
        self._wait_until_blocked_by_us(self._pid.get(timeout=30))

    def _run(self, call: Callable[[], T]) -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                self._pid.put(cursor.fetchone()[0])
            self._result = call()
        except BaseException as exc:
            self._error = exc
        finally:
            connection.close()

    def _wait_until_blocked_by_us(self, pid: int, limit: float = 60) -> None:
        deadline = time.monotonic() + limit
        with connection.cursor() as cursor:
            while time.monotonic() < deadline:
                # Live lock-manager state (not a per-transaction snapshot like pg_stat_activity).
                cursor.execute("SELECT pg_backend_pid() = ANY(pg_blocking_pids(%s))", [pid])
                if cursor.fetchone()[0]:
                    return
                if not self._thread.is_alive():
                    raise AssertionError(
                        f"the concurrent call finished without waiting for our lock: "
                        f"{self._error or self._result!r}"
                    )
                time.sleep(0.02)
        raise AssertionError(f"backend {pid} never waited for a lock this transaction holds")

    def result(self) -> T:
        """After our commit: what the call returned (or raise what it raised)."""
        self._thread.join(60)
        assert not self._thread.is_alive(), "the concurrent call is still blocked"
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def test_a_second_approval_waits_for_the_first_and_completes_the_quorum(
    pending_request: Any, make_user: Any
) -> None:
    req, alice, bob = pending_request(), make_user("alice"), make_user("bob")
    with transaction.atomic():
        first = decide(req.pk, alice, "approve", otp_verified_at=timezone.now())
        assert first.approvals_received == 1
        second = Waiting(lambda: decide(req.pk, bob, "approve", otp_verified_at=timezone.now()))
    outcome = second.result()
    assert outcome.approvals_received == 2  # bob's transaction counted alice's committed approval
    assert SigningRequest.objects.get(pk=req.pk).state == "signed"
    assert Signature.objects.filter(request=req).count() == 1
    assert req.approvals.count() == 2


def test_the_same_person_approving_on_two_connections_is_counted_once(
    pending_request: Any, make_user: Any
) -> None:
    req, alice = pending_request(), make_user("alice")
    with transaction.atomic():
        decide(req.pk, alice, "approve", otp_verified_at=timezone.now())
        again = Waiting(lambda: decide(req.pk, alice, "approve", otp_verified_at=timezone.now()))
    with pytest.raises(SigningRefused) as refused:
        again.result()
    assert refused.value.code == "already_decided"
    assert req.approvals.count() == 1
    assert SigningRequest.objects.get(pk=req.pk).state == "pending_approval"


def test_a_retry_waits_on_the_idempotency_key_and_answers_with_the_first_request(
    issue_token: Any, active_keys: Any
) -> None:
    token = issue_token()

    def post() -> Any:
        return authed(APIClient(), token).post(
            URL, request_body(), format="json", HTTP_IDEMPOTENCY_KEY="build-7"
        )

    with transaction.atomic():
        first = post()
        assert first.status_code == 201, first.content
        retry = Waiting(post)  # its insert waits on the unique index for our uncommitted row
    response = retry.result()
    assert response.status_code == 200, response.content
    assert response.json()["id"] == first.json()["id"]
    assert SigningRequest.objects.count() == 1
    assert Signature.objects.count() == 1


def test_a_confirmation_waiting_on_a_completing_ceremony_makes_no_second_key(
    make_user: Any, active_keys: Any
) -> None:
    from django.contrib.auth.models import Group

    from approvals.groups import custodian_group

    def custodian(name: str) -> Any:
        user = make_user(name, approves=())
        user.groups.add(Group.objects.get_or_create(name=custodian_group("staging"))[0])
        return user

    kim, lee, max_ = custodian("kim"), custodian("lee"), custodian("max")
    c = ceremonies.open_ceremony("staging", kim, otp_verified_at=timezone.now())
    with transaction.atomic():
        done = ceremonies.confirm(c.pk, lee, otp_verified_at=timezone.now())
        assert done.state == CeremonyState.COMPLETED
        late = Waiting(lambda: ceremonies.confirm(c.pk, max_, otp_verified_at=timezone.now()))
    with pytest.raises(SigningRefused) as refused:
        late.result()
    assert refused.value.code == "ceremony_closed"
    active = list(SigningKey.objects.filter(authority="staging", state=KeyState.ACTIVE))
    assert active == [done.key]
    assert SigningKey.objects.get(pk=active_keys["staging"].pk).state == KeyState.TRANSITION


def test_a_second_signer_waits_for_the_claim_and_signs_nothing(
    issue_token: Any, active_keys: Any, celery_app_for_tests: Any, settings: Any
) -> None:
    settings.SIGNING_MODE = "worker"  # the request stays approved; nobody consumes the queue
    response = authed(APIClient(), issue_token()).post(URL, request_body(), format="json")
    assert response.json()["state"] == "approved", response.content
    pk = response.json()["id"]
    with transaction.atomic():
        assert sign(pk).state == "signed"
        other = Waiting(lambda: sign(pk))  # its conditional UPDATE waits on our row lock
    assert other.result().state == "signed"  # re-checked after our commit: nothing to claim
    assert Signature.objects.filter(request_id=pk).count() == 1


def on_another_connection(call: Callable[[], T]) -> T:
    """``call`` on its own connection, refused if it would wait 5 s for a lock."""
    result: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '5s'")
                result.put(call())
        except BaseException as exc:
            result.put(exc)
        finally:
            connection.close()

    threading.Thread(target=run, daemon=True).start()
    outcome = result.get(timeout=30)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[no-any-return]


def test_signature_stores_share_the_key_and_its_revocation_waits_for_them(
    active_keys: Any,
) -> None:
    key = active_keys["staging"]
    with transaction.atomic():
        assert SigningKey.objects.lock_if_active(key.pk)  # a store under way (API, worker, chunk)
        # Another process's store goes on at once (not one store at a time) ...
        assert on_another_connection(lambda: SigningKey.objects.lock_if_active(key.pk)) is True
        # ... but revoking the key waits until the stores under way are committed.
        revoking = Waiting(
            lambda: revoke(key.pk, reason="compromised", effective_at=None, actor="ir@tests")
        )
    assert revoking.result().key_id == key.pk
    with transaction.atomic():
        assert not SigningKey.objects.lock_if_active(key.pk)  # stores after it store nothing
