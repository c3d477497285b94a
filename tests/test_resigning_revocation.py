"""Revocation end to end: a key that made 10,000 signatures is revoked with its effective
time in the middle; exactly those at or after it are quarantined and rejected by the
verifier; once a new key is active the worker re-signs them into valid bundles, linked to
the old ones, that verify with the new public key.

The signatures are real (the service's statements, signed by the SoftHSM key, in real
bundles) but inserted in bulk. Re-signing runs in a real celery worker. The times printed
are for the lead's figures; nothing here asserts on time.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from keys.models import Incident, ResignBatch
from keys.revocation import revoke
from signing_service import bundle
from signing_service.client import gate
from signing_service.client import trust as client_trust
from signing_service.models import Signature
from signing_service.trust import current_document
from tests.redis_fixtures import WorkerProcess
from tests.resigning_helpers import backdate, bulk_signed, new_key, supersedes_entry, wait_for

pytestmark = [pytest.mark.softhsm, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

N = 10_000
DEPLOYMENT = "development_deployment"  # accepts staging, wants no provenance: the key decides


def verdicts(sigs: list[Signature]) -> dict[bool, list[Signature]]:
    """The deployment gate's verdict on each bundle, from the service's trust document."""
    doc = client_trust.parse(current_document().envelope.encode())
    now = datetime.now(UTC)
    out: dict[bool, list[Signature]] = {True: [], False: []}
    for sig in sigs:
        verdict = gate.evaluate(
            doc, DEPLOYMENT, sig.bundle.encode(), mode="strict", now=now, rehash=lambda _: []
        )
        out[verdict.accepted].append(sig)
    return out


def api_verdict(sig: Signature) -> dict[str, Any]:
    body = {"deployment": DEPLOYMENT, "bundle": json.loads(sig.bundle)}
    response = APIClient().post("/api/v1/verify/", body, format="json")
    assert response.status_code == 200, response.content
    return dict(response.json())


def test_revoking_a_key_with_10000_signatures_quarantines_half_and_re_signs_them(
    celery_worker_process: WorkerProcess, active_keys: Any, settings: Any
) -> None:
    settings.SIGNING_MODE = "worker"
    old = backdate(active_keys["staging"], days=20)
    start = timezone.now() - timedelta(days=10)
    made = time.perf_counter()
    olds = bulk_signed(old, N, start=start, step=timedelta(minutes=1))
    made = time.perf_counter() - made
    effective = start + (N // 2) * timedelta(minutes=1)  # exactly the 5,001st signature

    began = time.perf_counter()
    incident = revoke(old.pk, reason="compromised", effective_at=effective, actor="ir@company.com")
    quarantine_ms = (time.perf_counter() - began) * 1000
    assert incident.quarantined == N // 2
    quarantined = {s.pk for s in Signature.objects.filter(key=old, state="quarantined")}
    assert quarantined == {s.pk for s in olds if s.signed_at >= effective}

    checked = verdicts(olds)
    assert {s.pk for s in checked[False]} == quarantined
    assert len(checked[True]) == N // 2
    rejected = api_verdict(olds[-1])
    assert rejected["verdict"] == "reject"
    assert any(c["name"] == "key state" and "revoked" in c["detail"] for c in rejected["checks"])
    assert api_verdict(olds[0])["verdict"] == "accept"  # made before the effective time

    began = time.perf_counter()
    new = new_key("staging")  # activation plans after the commit; the worker re-signs
    batch = ResignBatch.objects.get()
    assert (batch.reason, batch.state, batch.total, batch.incident_id) == (
        "revocation",
        "running",
        N // 2,
        incident.pk,
    )
    wait_for(
        lambda: ResignBatch.objects.get(pk=batch.pk).state == "completed",
        timeout=900,
        what=f"the batch to complete\n{celery_worker_process.output()[-3000:]}",
    )
    resign_s = time.perf_counter() - began

    successors = list(Signature.objects.filter(key=new).select_related("supersedes"))
    assert len(successors) == N // 2
    assert {s.supersedes_id for s in successors} == quarantined
    assert not Signature.objects.filter(key=old, state="quarantined").exists()
    assert Signature.objects.filter(key=old, state="superseded").count() == N // 2
    assert Signature.objects.filter(key=old, state="valid").count() == N // 2
    public = bundle.load_public_key(new.public_key_pem)
    for sig in successors:
        verified = bundle.verify_bundle(sig.bundle, public)
        assert verified.service_metadata["request_id"] == str(sig.request_id)
        assert verified.service_metadata["request_id"] == str(sig.supersedes.request_id)
    for sig in successors[:20]:
        assert supersedes_entry(sig) == {
            "signature": sig.supersedes_id,
            "key_hint": old.hint,
            "payload_digest": sig.supersedes.payload_digest,
            "reason": "revocation",
        }
    assert len(verdicts(successors)[True]) == N // 2
    assert api_verdict(successors[0])["verdict"] == "accept"
    assert Incident.objects.get(pk=incident.pk).state == "resolved"
    print(
        f"\n{N} real signatures made and stored in {made:.1f} s; revoke + quarantine "
        f"{N // 2}: {quarantine_ms:.0f} ms; re-sign {N // 2} through the worker "
        f"(2 processes, {connection.vendor}): {resign_s:.1f} s ({N // 2 / resign_s:.0f}/s)"
    )
