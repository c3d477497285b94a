"""Migration 0009 moves every stored bundle into signing_service_signaturebundle, and back.

Runs on the test database itself (and again on PostgreSQL in `make test`'s second pass): the
migration is reversed, rows are stored with the old column, then it is applied and reversed
again; the database is migrated back to the latest state whatever happens.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from keys.models import KeyState, SigningKey
from signing_service.models import RequestState, Signature, SignatureBundle, SigningRequest

BEFORE = ("signing_service", "0008_signature_resign_planned_partial_index")
AFTER = ("signing_service", "0009_signature_bundles_own_table")
DIGEST = "0" * 64
BUNDLES = ['{"mediaType": "a"}', '{"mediaType": "b", "text": "' + "é" * 2000 + '"}']


def migrate(*targets: tuple[str, str]) -> None:
    MigrationExecutor(connection).migrate(list(targets))


def insert_old_rows(key: SigningKey) -> list[int]:
    """Signatures as 0008 stored them: the bundle in the signature's own row."""
    ids = []
    for i, text in enumerate(BUNDLES):
        req = SigningRequest.objects.create(
            authority="staging", model_name=f"m{i}", model_version="1", resources=[],
            root_digest=DIGEST, statement_digest=DIGEST, policy_digest=DIGEST,
            state=RequestState.SIGNED, requester="ci@company.com", body_digest=DIGEST,
        )  # fmt: skip
        signed_at = connection.ops.adapt_datetimefield_value(timezone.now() - timedelta(hours=i))
        request_id = SigningRequest._meta.pk.get_db_prep_value(req.pk, connection)
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO signing_service_signature (request_id, key_id, signer_identity,"
                " bundle, payload_digest, state, signed_at, resign_attempts)"
                " VALUES (%s, %s, '', %s, %s, 'valid', %s, 0)",
                [request_id, key.pk, text, DIGEST, signed_at],
            )
        ids.append(Signature.objects.get(request=req).pk)
    return ids


def old_column() -> list[tuple[int, str]]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, bundle FROM signing_service_signature ORDER BY id")
        return [(row[0], row[1]) for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_it_keeps_every_bundle_across_the_migration_and_its_reverse() -> None:
    leaves = MigrationExecutor(connection).loader.graph.leaf_nodes()
    key = SigningKey.objects.create(
        authority="staging", backend="pkcs11", key_ref={}, public_key_pem="-", hint="0" * 64,
        state=KeyState.ACTIVE,
    )  # fmt: skip
    try:
        migrate(BEFORE)
        ids = insert_old_rows(key)
        migrate(AFTER)
        with connection.cursor() as cursor:
            columns = connection.introspection.get_table_description(
                cursor, "signing_service_signature"
            )
        assert "bundle" not in {c.name for c in columns}
        moved = Signature.objects.with_bundle().filter(pk__in=ids).order_by("pk")
        assert [(s.pk, s.bundle) for s in moved] == list(zip(ids, BUNDLES, strict=True))
        migrate(BEFORE)
        assert old_column() == list(zip(ids, BUNDLES, strict=True))
    finally:
        migrate(*leaves)
    copied = SignatureBundle.objects.filter(signature__in=ids).order_by("pk")
    assert [(b.signature_id, b.json) for b in copied] == list(zip(ids, BUNDLES, strict=True))


def bundle_storage() -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attstorage FROM pg_attribute"
            " WHERE attrelid = 'signing_service_signaturebundle'::regclass AND attname = 'json'"
        )
        return str(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_postgresql_stores_bundles_without_trying_to_compress_them() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("a PostgreSQL storage setting (SQLite has none)")
    leaves = MigrationExecutor(connection).loader.graph.leaf_nodes()
    assert bundle_storage() == "e"  # EXTERNAL: out of line when large, never compressed
    try:
        migrate(("signing_service", "0012_signature_resign_index_without_attempts"))
        assert bundle_storage() == "x"  # EXTENDED, PostgreSQL's default for text
    finally:
        migrate(*leaves)
    assert bundle_storage() == "e"
