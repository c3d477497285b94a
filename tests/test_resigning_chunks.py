"""A chunk at a time: claimed with one attempt each, signed, stored in one transaction; a
signature that fails, conflicts or kills its signer does so alone.

Not transactional: no on_commit hook runs, so each test plans and re-signs by hand.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keys import resigning
from keys.models import ResignBatch
from keys.revocation import revoke
from provenance.models import ProvenanceRecord
from signing_service import audit, bundle, signing
from signing_service.models import AuditEntry, Signature, SigningRequest
from tests import provenance_helpers
from tests.resigning_helpers import backdate, bulk_signed, rotate

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db]


def planned(active_keys: Any, n: int) -> tuple[ResignBatch, list[int]]:
    """``n`` staging signatures of a rotated key, planned into a running batch."""
    old = backdate(active_keys["staging"])
    sigs = bulk_signed(old, n, start=timezone.now() - timedelta(hours=n), step=timedelta(hours=1))
    rotate(old)
    (batch,) = resigning.plan_for_authority("staging")
    assert batch.state == "running"
    return batch, [s.pk for s in sigs]


def attempts(pks: list[int]) -> dict[int, tuple[str, int]]:
    rows = Signature.objects.filter(pk__in=pks).values_list("pk", "state", "resign_attempts")
    return {pk: (state, tries) for pk, state, tries in rows}


def successors(pks: list[int]) -> int:
    return Signature.objects.filter(supersedes__in=pks).count()


def test_a_chunk_is_stored_with_a_fixed_number_of_queries(active_keys: Any) -> None:
    batch, pks = planned(active_keys, 120)
    with CaptureQueriesContext(connection) as queries:
        assert resigning.resign_many(batch.pk, pks) == ({"resigned": 120}, [])
    # Claim, load, lock the key, supersede, insert successors and audit records: not one
    # query per signature (bulk inserts split into a few statements on SQLite).
    assert len(queries) <= 30, [q["sql"][:80] for q in queries.captured_queries]
    assert set(attempts(pks).values()) == {("superseded", 1)}
    assert successors(pks) == 120
    records = AuditEntry.objects.filter(action="signature.resigned").order_by("seq")
    assert [r.data["supersedes"] for r in records] == pks
    new = Signature.objects.get(supersedes=pks[0])
    assert (records[0].target_id, records[0].data["payload_digest"]) == (
        str(new.pk),
        new.payload_digest,
    )
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)
    public = bundle.load_public_key(batch.new_key.public_key_pem)
    assert bundle.verify_bundle(new.bundle, public).service_metadata["request_id"] == str(
        new.request_id
    )
    assert resigning.resign_many(batch.pk, pks) == ({"done": 120}, [])  # a redelivery
    assert successors(pks) == 120


def test_a_statement_with_provenance_keeps_its_summary_and_the_query_count(
    active_keys: Any,
) -> None:
    # The chunk loads only what the statements need (not the provenance payload or bundle):
    # the summary the approvals covered must still be in the re-signed statement.
    batch, pks = planned(active_keys, 3)
    req = SigningRequest.objects.get(signatures=pks[1])
    record = ProvenanceRecord.objects.create(
        request=req,
        statement=provenance_helpers.statement(req.root_digest),
        statement_digest="d" * 64,
        subject_digest=req.root_digest,
        builder_id=provenance_helpers.GITHUB_BUILDER,
        build_type=provenance_helpers.BUILD_TYPE,
        bundle='{"big": "bundle"}',
    )
    req.refresh_from_db()  # its statement now binds the provenance summary
    SigningRequest.objects.filter(pk=req.pk).update(statement_digest=signing.statement_digest(req))
    with CaptureQueriesContext(connection) as queries:
        assert resigning.resign_many(batch.pk, pks) == ({"resigned": 3}, [])
    sql = [q["sql"] for q in queries.captured_queries]
    assert len(sql) <= 30, [q[:80] for q in sql]
    # Read with the chunk's join, once, without its bundle (no deferred field loaded later).
    assert not [q for q in sql if 'FROM "provenance_provenancerecord"' in q]
    assert not [q for q in sql if '"provenance_provenancerecord"."bundle"' in q]
    new = Signature.objects.get(supersedes=pks[1])
    public = bundle.load_public_key(batch.new_key.public_key_pem)
    meta = bundle.verify_bundle(new.bundle, public).service_metadata
    assert meta["provenance"] == record.predicate_summary()
    assert meta["supersedes"]["signature"] == pks[1]


def test_a_signature_that_cannot_be_re_signed_fails_alone(active_keys: Any) -> None:
    batch, pks = planned(active_keys, 3)
    SigningRequest.objects.filter(signatures=pks[1]).update(model_version="9.9")
    assert resigning.resign_many(batch.pk, pks) == ({"resigned": 2, "failed": 1}, [])
    assert attempts(pks) == {
        pks[0]: ("superseded", 1),
        pks[1]: ("valid", resigning.MAX_ATTEMPTS),
        pks[2]: ("superseded", 1),
    }
    batch.refresh_from_db()
    assert [f["signature"] for f in batch.failures] == [pks[1]]


def test_an_unexpected_error_fails_only_its_signature_which_is_retried_alone(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, pks = planned(active_keys, 3)
    real_sign = resigning._sign

    def broken_for_one(sig: Signature, batch: ResignBatch, *rest: Any) -> Any:
        if sig.pk == pks[0]:
            raise RuntimeError("a bug that only this signature hits")
        return real_sign(sig, batch, *rest)

    monkeypatch.setattr(resigning, "_sign", broken_for_one)
    assert resigning.resign_many(batch.pk, pks) == ({"resigned": 2, "error": 1}, [])
    assert attempts(pks)[pks[0]] == ("valid", 1)
    monkeypatch.setattr(resigning, "_sign", real_sign)
    # Tried before: on its own now, through resign_one (a second counted attempt).
    assert resigning.resign_many(batch.pk, pks) == ({"resigned": 1, "done": 2}, [])
    assert attempts(pks)[pks[0]] == ("superseded", 2)
    assert successors(pks) == 3


def test_a_signature_taken_by_another_signer_meanwhile_is_left_to_it(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, pks = planned(active_keys, 3)
    real_store_many = resigning._store_many

    def another_signer_first(batch: ResignBatch, built: Any) -> Any:
        # A redelivered copy of the message re-signs the middle one while we signed.
        assert resigning.resign_one(pks[1], finish=False) == "resigned"
        return real_store_many(batch, built)

    monkeypatch.setattr(resigning, "_store_many", another_signer_first)
    assert resigning.resign_many(batch.pk, pks) == ({"resigned": 2, "done": 1}, [])
    for pk in pks:
        assert Signature.objects.filter(supersedes=pk).count() == 1
    assert AuditEntry.objects.filter(action="signature.resigned").count() == 3
    assert audit.verify_chain() == (AuditEntry.objects.count(), None)


def test_a_key_revoked_while_the_chunk_was_signed_stores_nothing(active_keys: Any) -> None:
    batch, pks = planned(active_keys, 2)
    sigs = list(Signature.objects.filter(pk__in=pks).select_related("key", "request"))
    built = [(sig, *resigning._sign(sig, batch)) for sig in sigs]
    revoke(batch.new_key_id, reason="compromised", effective_at=None, actor="ir")
    assert resigning._store_many(batch, built) == {"done": 2}
    assert successors(pks) == 0
    assert not AuditEntry.objects.filter(action="signature.resigned").exists()


class Killed(BaseException):
    """What kill -9 of the signer does to the chunk: nothing after it runs."""


def test_a_signature_that_kills_its_signer_uses_up_only_its_own_attempts(
    active_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, pks = planned(active_keys, 4)
    poison = pks[1]
    real_sign = resigning._sign

    def dies_on_poison(sig: Signature, batch: ResignBatch, *rest: Any) -> Any:
        if sig.pk == poison:
            raise Killed
        return real_sign(sig, batch, *rest)

    monkeypatch.setattr(resigning, "_sign", dies_on_poison)
    kills = 0
    while True:  # each message redelivered after its worker died
        try:
            outcomes, waiting = resigning.resign_many(batch.pk, pks)
            break
        except Killed:
            kills += 1
    # The first kill hit the whole claimed chunk (nothing stored); after it every signature
    # was retried on its own, so the poison used up its attempts and nobody else's.
    assert kills == resigning.MAX_ATTEMPTS
    assert (outcomes, waiting) == ({"failed": 1, "done": 1, "resigned": 2}, [])
    assert attempts(pks) == {
        pks[0]: ("superseded", 2),
        poison: ("valid", resigning.MAX_ATTEMPTS),
        pks[2]: ("superseded", 2),
        pks[3]: ("superseded", 2),
    }
    assert resigning.finish_if_done(batch.pk)
    batch.refresh_from_db()
    assert batch.failures == [
        {"signature": poison, "reason": f"gave up after {resigning.MAX_ATTEMPTS} attempts"}
    ]
