"""Re-signing (SPEC section 12): time to quarantine and to re-sign N signatures through a
real Celery worker, against a bare PKCS#11 signing loop of N on the same token, same run.

    .venv/bin/python bench/bench_resign.py [--signatures 10000] [--concurrency 2]
        [--database sqlite|postgres] [--inline]

Builds everything throwaway: a SQLite database (or, with ``--database postgres``, a
PostgreSQL cluster from tests/postgres_server.py), a SoftHSM token, a redis-server on a free
port. A staging key makes N real signatures (the service's statements, signed on the token,
stored in bulk), is revoked with its effective time before the first one (all N are
quarantined), a new key is activated, and the worker (prefork, ``--concurrency`` processes)
re-signs the batch. Timed: the revocation transaction, and activation-to-batch-completed,
with the CPU seconds the worker, this process (planning, sending) and the PostgreSQL server
spent meanwhile (the cores are shared: CPU time says what the work costs, wall time also
what else ran). The ratio to report is re-signs/s over bare CKM_ECDSA signs/s (one process).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="bench-resign-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)  # ~0.8 GB at 100,000
os.environ["VAR_DIR"] = str(TMP)
(TMP / "static").mkdir()

from benchdb import start_postgres, stop_postgres  # noqa: E402

from keys import softhsm  # noqa: E402  (loads no PKCS#11)

CONF = softhsm.write_conf(TMP / "softhsm")
os.environ["SOFTHSM2_CONF"] = str(CONF)  # before anything loads the module
LABEL, USER_PIN = f"bench-{secrets.token_hex(4)}", secrets.token_hex(8)
softhsm.init_token(CONF, LABEL, secrets.token_hex(8), USER_PIN)
PIN_FILE = TMP / "user.pin"
PIN_FILE.write_text(USER_PIN + "\n")
PIN_FILE.chmod(0o600)
os.environ.update(
    DJANGO_SETTINGS_MODULE="signing_service.settings",
    DATABASE_URL=f"sqlite:///{TMP / 'bench.sqlite3'}",
    PKCS11_MODULE=softhsm.SOFTHSM_MODULE,
    PKCS11_PIN_FILE=str(PIN_FILE),
    PKCS11_TOKEN_STAGING=LABEL,
    SIGNING_MODE="worker",
    C_FORCE_ROOT="1",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis() -> subprocess.Popen[bytes]:
    port = free_port()
    proc = subprocess.Popen(
        ["/usr/bin/redis-server", "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
         "--port", str(port), "--dir", str(TMP)],
        stdout=(TMP / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"redis-server did not start: {(TMP / 'redis.log').read_text()}")


def start_worker(concurrency: int) -> subprocess.Popen[bytes]:
    log = TMP / "worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery", "worker", "-Q",
         "signing,maintenance", "--pool", "prefork", "--concurrency", str(concurrency),
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited:\n{log.read_text()}")
        if " ready." in log.read_text(errors="replace"):
            return proc
        time.sleep(0.1)
    raise SystemExit(f"the worker did not get ready:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--inline", action="store_true", help="re-sign in this process instead (no worker)"
    )
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    if args.signatures < 1:
        parser.error("--signatures must be at least 1")
    if args.inline:
        os.environ["SIGNING_MODE"] = "inline"
    cluster = start_postgres() if args.database == "postgres" else None
    redis = start_redis()
    worker = None
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        if not args.inline:
            worker = start_worker(args.concurrency)
        run(args.signatures, worker, cluster)
    finally:
        if worker is not None:
            os.killpg(worker.pid, 15)
            worker.wait(30)
        redis.terminate()
        redis.wait(10)
        stop_postgres(cluster)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its living descendants (from /proc)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass  # it exited meanwhile
    return total


def cpu_now(worker, cluster) -> dict[str, float]:  # type: ignore[no-untyped-def]
    spent = {"this process": time.process_time()}
    if worker is not None:
        spent["worker"] = cpu_seconds(worker.pid)
    if cluster is not None and cluster.proc is not None:
        spent["PostgreSQL"] = cpu_seconds(cluster.proc.pid)
    return spent


def run(n: int, worker, cluster) -> None:  # type: ignore[no-untyped-def]
    from django.utils import timezone

    from keys.models import ResignBatch, SigningKey
    from keys.revocation import revoke

    old = new_key()
    SigningKey.objects.filter(pk=old.pk).update(not_before=timezone.now() - timedelta(days=30))
    start = timezone.now() - timedelta(days=20)
    made = time.perf_counter()
    signed(old, n, start)
    made = time.perf_counter() - made

    began = time.perf_counter()
    incident = revoke(old.pk, reason="compromised", effective_at=start, actor="bench")
    quarantine = time.perf_counter() - began
    assert incident.quarantined == n

    load_before = os.getloadavg()
    cpu_before = cpu_now(worker, cluster)
    began, began_at = time.perf_counter(), timezone.now()
    new = new_key()  # plans the batch after its commit and sends it to the worker
    sent = time.perf_counter() - began
    batch = ResignBatch.objects.get(new_key=new)
    while ResignBatch.objects.get(pk=batch.pk).state != "completed":
        time.sleep(0.1)
    resign = time.perf_counter() - began
    cpu = {name: spent - cpu_before[name] for name, spent in cpu_now(worker, cluster).items()}
    from signing_service.models import Signature

    assert Signature.objects.filter(key=new, supersedes__key=old).count() == n
    assert not ResignBatch.objects.get(pk=batch.pk).failures

    bare = bare_loop(new, n)
    report(n, made, quarantine, resign, bare, cpu, load_before)
    print(timeline(new, began_at, sent, resign))


def timeline(new, began_at, sent: float, resign: float) -> str:  # type: ignore[no-untyped-def]
    """When the re-signatures were made, in seconds after activation: where the wall time of
    a run went besides signing (planning, the worker's start, a tail with one process busy)."""
    from django.db.models import Max, Min

    from signing_service.models import Signature

    times = Signature.objects.filter(key=new).aggregate(
        first=Min("signed_at"), last=Max("signed_at")
    )
    first, last = ((times[k] - began_at).total_seconds() for k in ("first", "last"))
    return (f"timeline, s after activation: key active, batch planned and sent +{sent:.1f}; "
            f"first re-signature +{first:.1f}; last +{last:.1f}; batch completed +{resign:.1f}")  # fmt: skip


def new_key():  # type: ignore[no-untyped-def]
    from keys import registry
    from keys.lifecycle import register_key

    backend = registry.pkcs11_backend("staging")
    generated = backend.generate(f"staging-{secrets.token_hex(4)}", "ECDSA-P256")
    return register_key(
        "staging", backend, generated, algorithm="ECDSA-P256", validity=timedelta(days=365),
        actor="bench", activate=True,
    )  # fmt: skip


def signed(key, n: int, start) -> None:  # type: ignore[no-untyped-def]
    """n signatures as the service makes them (statement, HSM signature, bundle), in bulk."""
    from keys.registry import backend_for
    from signing_service import bundle, signing
    from signing_service.manifest import Resource
    from signing_service.models import Signature, SigningRequest
    from signing_service.policy import current_policy

    policy = current_policy().digest
    requests = []
    for i in range(n):
        digest = hashlib.sha256(f"model-{i}".encode()).hexdigest()
        resources = [Resource(name="model.safetensors", algorithm="sha256", digest=digest)]
        req = SigningRequest(
            authority="staging", model_name=f"model-{i}", model_version="1.0",
            resources=[r.to_json() for r in resources], policy_digest=policy, state="signed",
            requester="ml-platform-ci@company.com", body_digest=digest,
        )  # fmt: skip
        req.root_digest = bundle.build_statement(req.model_name, resources)["subject"][0]["digest"][
            "sha256"
        ]
        req.statement_digest = signing.statement_digest(req)
        requests.append(req)
    SigningRequest.objects.bulk_create(requests, batch_size=2000)
    backend, rows = backend_for(key), []
    for i, req in enumerate(requests):
        at = start + timedelta(seconds=i)
        payload = bundle.statement_payload(
            signing._signed_statement(req, key, at.isoformat(), signing.base_statement(req))
        )
        der = backend.sign(key.key_ref, bundle.pae(payload))
        sig = Signature(
            request=req, key=key, signed_at=at, payload_digest=bundle.payload_digest(payload)
        )
        built = bundle.build_bundle(payload, der, hint=key.hint)
        rows.append((sig, bundle.bundle_bytes(built).decode()))
    Signature.objects.store_many(rows)


def bare_loop(key, n: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds for n bare CKM_ECDSA signatures on a precomputed digest, cached handle."""
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    # This process is logged in (it signed above): a second session rides on that login.
    session = pkcs11.lib(softhsm.SOFTHSM_MODULE).get_token(token_label=LABEL).open()
    private = session.get_key(
        object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(key.key_ref["id"])
    )
    digest = hashlib.sha256(b"bench").digest()
    began = time.perf_counter()
    for _ in range(n):
        private.sign(digest, mechanism=Mechanism.ECDSA)
    elapsed = time.perf_counter() - began
    session.close()
    return elapsed


def report(
    n: int,
    made: float,
    quarantine: float,
    resign: float,
    bare: float,
    cpu: dict[str, float],
    load_before: tuple[float, float, float],
) -> None:
    from django.db import connection

    from keys import resigning

    def loads(values: tuple[float, float, float]) -> str:
        return ", ".join(f"{x:.2f}" for x in values)

    where = "in this process" if os.environ["SIGNING_MODE"] == "inline" else "through the worker"
    print(
        f"{os.cpu_count()} CPUs, load average {loads(load_before)} before re-signing, "
        f"{loads(os.getloadavg())} at the end; {connection.vendor}, redis-server, SoftHSM2"
    )
    print(f"{n} real signatures made and stored (setup): {made:.1f} s")
    print(f"revoke + quarantine {n} (one transaction): {quarantine * 1000:.0f} ms")
    print(f"re-sign {n} {where} (chunks of {resigning.CHUNK}; activation -> batch completed): "
          f"{resign:.1f} s = {n / resign:,.0f}/s")  # fmt: skip
    print("CPU meanwhile: " + ", ".join(
        f"{name} {spent:.1f} s ({spent / n * 1000:.2f} ms per signature)"
        for name, spent in cpu.items()
    ))  # fmt: skip
    print(f"bare PKCS#11 CKM_ECDSA loop of {n}: {bare:.2f} s = {n / bare:,.0f}/s")
    print(f"ratio re-sign / bare: {bare / resign:.4f} (1 / {resign / bare:.0f})")


if __name__ == "__main__":
    main()
