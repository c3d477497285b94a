"""Revocation: time to revoke a key and quarantine N of its signatures, in one transaction.

Usage: .venv/bin/python bench/bench_revocation.py [--signatures 100000] [--bundle-bytes 3000]
Builds a throwaway SQLite database (and signature rows as the service stores them), then
times keys.revocation.revoke() with the effective time in the middle: half are quarantined.
--bundle-bytes fills each row's bundle column with that many bytes (a real bundle is ~3 KB;
the default, 2, is the lean-row case).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["VAR_DIR"] = tempfile.mkdtemp(prefix="bench-revocation-")
os.makedirs(os.path.join(os.environ["VAR_DIR"], "static"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402

from keys.models import KeyState, SigningKey  # noqa: E402
from keys.revocation import revoke  # noqa: E402
from signing_service.models import RequestState, Signature, SignatureState, SigningRequest  # noqa: E402

DIGEST = hashlib.sha256(b"x").hexdigest()


def populate(key: SigningKey, n: int, bundle: str = "{}") -> timedelta:
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
        Signature.objects.bulk_create(
            Signature(
                request=r,
                key=key,
                bundle=bundle,
                payload_digest=DIGEST,
                signed_at=start + (offset + i) * step,
            )
            for i, r in enumerate(requests)
        )
    return start + (n // 2) * step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signatures", type=int, default=100_000)
    parser.add_argument("--bundle-bytes", type=int, default=2)
    args = parser.parse_args()
    # JSON of the requested size; random hex so that nothing compresses it away.
    filler = os.urandom(args.bundle_bytes // 2 + 1).hex()
    bundle = '{"x": "' + filler[: max(0, args.bundle_bytes - 9)] + '"}'
    if args.bundle_bytes <= 2:
        bundle = "{}"
    call_command("migrate", verbosity=0)
    key = SigningKey.objects.create(
        authority="staging",
        backend="pkcs11",
        key_ref={},
        public_key_pem="-",
        hint="0" * 64,
        state=KeyState.ACTIVE,
    )
    effective = populate(key, args.signatures, bundle)
    started = time.perf_counter()
    incident = revoke(key.pk, reason="compromised", effective_at=effective, actor="bench")
    elapsed = time.perf_counter() - started
    assert (
        Signature.objects.filter(state=SignatureState.QUARANTINED).count() == incident.quarantined
    )
    print(
        f"signatures of the key: {args.signatures} ({len(bundle)}-byte bundles); "
        f"quarantined: {incident.quarantined}"
    )
    print(
        f"revoke + quarantine + incident + audit, one transaction: {elapsed * 1000:.0f} ms (SQLite)"
    )


if __name__ == "__main__":
    main()
