"""Approver dashboard with N pending requests: server time and query count.

Usage: .venv/bin/python bench/bench_dashboard.py [--requests 10000] [--rounds 20]
Builds its own throwaway SQLite database under a temp VAR_DIR; prints median and p95 time of
GET / for an approver, beside a bare Django view that renders the same template with no rows.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["VAR_DIR"] = tempfile.mkdtemp(prefix="bench-dashboard-")
os.makedirs(os.path.join(os.environ["VAR_DIR"], "static"))
atexit.register(shutil.rmtree, os.environ["VAR_DIR"], ignore_errors=True)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")
os.environ.setdefault("ALLOWED_HOSTS", "testserver")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.models import Group  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402

from signing_service.models import RequestState, SigningRequest  # noqa: E402


def populate(n: int) -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    resources = [
        {"name": f"shard-{i:05d}.bin", "algorithm": "sha256", "digest": digest} for i in range(50)
    ]
    now = timezone.now()
    SigningRequest.objects.bulk_create(
        (
            SigningRequest(
                authority="production",
                model_name=f"model-{i}",
                model_version="1",
                state=RequestState.PENDING_APPROVAL,
                resources=resources,
                root_digest=digest,
                statement_digest=digest,
                policy_digest=digest,
                required_approvals=2,
                requester="ci@company.com",
                body_digest=digest,
                created_at=now,
            )
            for i in range(n)
        ),
        batch_size=2000,
    )


def timed(client: Client, path: str, rounds: int) -> list[float]:
    client.get(path)  # warm caches
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        response = client.get(path)
        out.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    user = get_user_model().objects.create_user("alice", "alice@company.com", "x" * 16)
    user.groups.add(Group.objects.get_or_create(name="approvers:production")[0])
    populate(args.requests)
    client = Client()
    client.force_login(user)
    client.get("/")  # the session's first request writes; measure the steady state
    with CaptureQueriesContext(connection) as ctx:
        client.get("/")
    queries = len(ctx.captured_queries)  # read now: the next request resets the log
    times = timed(client, "/", args.rounds)
    history = timed(client, "/history/", args.rounds)
    p50, p95 = statistics.median(times), sorted(times)[int(0.95 * (len(times) - 1))]
    print(f"pending requests: {args.requests}")
    print(f"dashboard GET /: p50 {p50:.1f} ms, p95 {p95:.1f} ms, {queries} queries")
    print(f"history GET /history/ (empty): p50 {statistics.median(history):.1f} ms")


if __name__ == "__main__":
    main()
