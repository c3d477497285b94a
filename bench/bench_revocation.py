"""Revocation: time to revoke a key and quarantine N of its signatures, in one transaction.

Usage: .venv/bin/python bench/bench_revocation.py [--signatures 100000] [--bundle-bytes 3000]
    [--database sqlite|postgres]
Builds a throwaway SQLite database (or, with --database postgres, a PostgreSQL cluster from
tests/postgres_server.py, fsync off as in the tests; the table is vacuumed before timing, as
autovacuum would have done to old signatures) and signature rows as the service stores them,
then times keys.revocation.revoke() with the effective time in the middle: half are
quarantined. --bundle-bytes stores bundles of that many bytes (a real bundle is ~3 KB; the
default, 2, is the lean case); they live in signing_service_signaturebundle, not in the rows
the quarantine UPDATE rewrites.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["VAR_DIR"] = tempfile.mkdtemp(prefix="bench-revocation-")
os.makedirs(os.path.join(os.environ["VAR_DIR"], "static"))
atexit.register(shutil.rmtree, os.environ["VAR_DIR"], ignore_errors=True)  # ~1 GB at 200,000
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")

from benchdb import start_postgres, stop_postgres  # noqa: E402

DIGEST = hashlib.sha256(b"x").hexdigest()


def populate(key: Any, n: int, bundle: str = "{}") -> Any:
    """N signed requests with one signature of ``key`` each, one second apart; the middle."""
    from django.utils import timezone

    from signing_service.models import RequestState, Signature, SigningRequest

    start, step = timezone.now() - timedelta(days=30), timedelta(seconds=1)
    for offset in range(0, n, 10_000):
        count = min(10_000, n - offset)
        requests = SigningRequest.objects.bulk_create(
            SigningRequest(
                authority="staging", model_name=f"m{offset + i}", model_version="1", resources=[],
                root_digest=DIGEST, statement_digest=DIGEST, policy_digest=DIGEST,
                state=RequestState.SIGNED, requester="ci@company.com", body_digest=DIGEST,
            )
            for i in range(count)
        )  # fmt: skip
        Signature.objects.store_many(
            (
                Signature(
                    request=r, key=key, payload_digest=DIGEST, signed_at=start + (offset + i) * step
                ),
                bundle,
            )
            for i, r in enumerate(requests)
        )
    return start + (n // 2) * step


def run(signatures: int, bundle: str, database: str) -> None:
    from django.core.management import call_command
    from django.db import connection

    from keys.models import KeyState, SigningKey
    from keys.revocation import revoke
    from signing_service.models import Signature, SignatureState

    call_command("migrate", verbosity=0)
    key = SigningKey.objects.create(
        authority="staging",
        backend="pkcs11",
        key_ref={},
        public_key_pem="-",
        hint="0" * 64,
        state=KeyState.ACTIVE,
    )
    effective = populate(key, signatures, bundle)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE signing_service_signature")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    incident = revoke(key.pk, reason="compromised", effective_at=effective, actor="bench")
    elapsed = time.perf_counter() - started
    assert (
        Signature.objects.filter(state=SignatureState.QUARANTINED).count() == incident.quarantined
    )
    print(
        f"signatures of the key: {signatures} ({len(bundle)}-byte bundles); "
        f"quarantined: {incident.quarantined}"
    )
    print(
        f"revoke + quarantine + incident + audit, one transaction: {elapsed * 1000:.0f} ms "
        f"({database}, load average {load:.2f} before)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signatures", type=int, default=100_000)
    parser.add_argument("--bundle-bytes", type=int, default=2)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    if args.signatures < 2:
        parser.error("--signatures must be at least 2 (half of them are quarantined)")
    # JSON of the requested size; random hex so that nothing compresses it away.
    filler = os.urandom(args.bundle_bytes // 2 + 1).hex()
    bundle = '{"x": "' + filler[: max(0, args.bundle_bytes - 9)] + '"}'
    if args.bundle_bytes <= 2:
        bundle = "{}"
    cluster = start_postgres() if args.database == "postgres" else None
    try:
        import django

        django.setup()
        run(args.signatures, bundle, args.database)
    finally:
        stop_postgres(cluster)


if __name__ == "__main__":
    main()
