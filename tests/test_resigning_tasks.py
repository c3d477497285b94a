"""The re-signing tasks: queues and beat entry, chunked enqueue on commit, the sweep, and
inline mode never reaching for a broker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from keys import registry, resigning
from keys.models import ResignBatch
from signing_service.models import AuditEntry
from tests.resigning_helpers import backdate, bulk_signed, rotate
from worker.celery import app
from worker.tasks import resign as tasks

pytestmark = [pytest.mark.softhsm]


def test_the_sweep_runs_every_minute_on_maintenance_and_chunks_on_signing() -> None:
    app.finalize()  # merges the task modules' BEAT_SCHEDULE entries
    entry = app.conf.beat_schedule["sweep-resigning"]
    assert (entry["task"], entry["schedule"]) == ("worker.tasks.resign.sweep_resigning", 60.0)
    router = app.amqp.router
    assert router.route({}, tasks.sweep_resigning.name)["queue"].name == "maintenance"
    assert router.route({}, tasks.resign_chunk.name)["queue"].name == "signing"
    assert tasks.resign_chunk.acks_late


@pytest.mark.django_db(transaction=True)
def test_inline_mode_re_signs_without_any_broker(
    active_keys: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.SIGNING_MODE == "inline"
    monkeypatch.setattr(app.conf, "broker_url", "redis://127.0.0.1:1/0")  # nothing listens

    def no_broker(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("inline mode must not enqueue")

    monkeypatch.setattr(tasks.resign_chunk, "delay", no_broker)
    old = backdate(active_keys["staging"])
    bulk_signed(old, 3, start=timezone.now() - timedelta(hours=3), step=timedelta(hours=1))
    rotate(old)
    assert ResignBatch.objects.get().state == "completed"


@pytest.fixture
def sent(celery_app_for_tests: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int]]]:
    calls: list[tuple[str, list[int]]] = []
    monkeypatch.setattr(tasks.resign_chunk, "delay", lambda *args: calls.append(args))
    return calls


@pytest.mark.django_db(transaction=True)
def test_worker_mode_sends_chunks_after_the_commit(
    active_keys: Any, settings: Any, sent: list[tuple[str, list[int]]], monkeypatch: Any
) -> None:
    settings.SIGNING_MODE = "worker"
    assert resigning.CHUNK == 500
    monkeypatch.setattr(resigning, "CHUNK", 50)  # 120 signatures make three messages
    old = backdate(active_keys["staging"])
    sigs = bulk_signed(
        old, 120, start=timezone.now() - timedelta(days=1), step=timedelta(minutes=1)
    )
    with transaction.atomic():
        rotate(old)
        assert sent == []  # not before the batch is visible to the worker
    batch = ResignBatch.objects.get()
    assert [len(ids) for _, ids in sent] == [50, 50, 20]
    assert {b for b, _ in sent} == {str(batch.pk)}
    assert sorted(pk for _, ids in sent for pk in ids) == sorted(s.pk for s in sigs)


@pytest.mark.django_db(transaction=True)
def test_the_sweep_sends_a_stalled_batch_again_once_per_stall(
    active_keys: Any, settings: Any, sent: list[tuple[str, list[int]]]
) -> None:
    settings.SIGNING_MODE = "worker"
    old = backdate(active_keys["staging"])
    bulk_signed(old, 7, start=timezone.now() - timedelta(days=1), step=timedelta(minutes=1))
    rotate(old)  # sent once; the messages are then lost (no worker, say Redis restarted)
    sent.clear()
    assert tasks.sweep_resigning(stall_seconds=300) == {"planned": 0, "completed": 0, "resent": 0}
    assert sent == []
    module = settings.PKCS11_MODULE
    settings.PKCS11_MODULE = "/nonexistent/libsofthsm2.so"  # the HSM is unreachable
    registry.reset()
    assert tasks.sweep_resigning(stall_seconds=0)["resent"] == 0  # it would only wait
    settings.PKCS11_MODULE = module
    registry.reset()
    assert tasks.sweep_resigning(stall_seconds=0)["resent"] == 7
    assert len(sent) == 1 and len(sent[0][1]) == 7
    assert AuditEntry.objects.filter(action="resign_batch.resent").count() == 1
    # The re-send itself counts as activity: the next sweep waits a whole stall period.
    assert tasks.sweep_resigning(stall_seconds=300)["resent"] == 0


@pytest.mark.django_db  # not transactional: the activation hook never ran
def test_the_sweep_plans_what_no_activation_hook_planned(active_keys: Any) -> None:
    old = backdate(active_keys["production"])
    bulk_signed(old, 2, start=timezone.now() - timedelta(hours=2), step=timedelta(hours=1))
    rotate(old)
    assert not ResignBatch.objects.exists()
    assert tasks.sweep_resigning()["planned"] == 1
    assert ResignBatch.objects.get().state == "pending_approval"
    assert tasks.sweep_resigning()["planned"] == 0
