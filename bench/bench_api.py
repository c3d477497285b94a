"""API (issue 8): signed requests/s through gunicorn, against a trivial DRF endpoint served by
the same gunicorn configuration, in one run.

    .venv/bin/python bench/bench_api.py [--seconds 10] [--rounds 3] [--connections 8]
        [--resources 4] [--gunicorn-arg=--worker-class=gthread ...]

Builds everything throwaway: a PostgreSQL cluster on a free loopback port
(tests/postgres_server.py), a SoftHSM token with an active staging key (an authority that
needs no approval), an API token for ml-platform-ci@company.com. Starts gunicorn with
deploy/gunicorn.conf.py on 127.0.0.1 with SIGNING_MODE=inline and the settings module
bench/bench_api_site.py: the project's settings and URLs plus POST /bench/trivial/, an
APIView that authenticates with the same classes (a bearer API token, one query) and answers
{"ok": true}. wrk (Debian package `wrk`) then drives both in alternating rounds of
``--seconds`` each at ``--connections`` connections; bench/bench_api.lua POSTs a new signing
request per call (its own version and file digests) and counts a response only if it is a
201 whose body says signed, with its key. Afterwards a sample of the returned requests'
bundles is fetched over the API and verified with the staging public key
(signing_service.bundle.verify_bundle: signature, statement, request id and version), every
request of the run must be signed exactly once, and the audit chain must verify.
Prints req/s, p50/p99 of each side, the ratio, and errors. Needs wrk (Debian package; `make test` and `make run` install it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from keys import softhsm  # noqa: E402  (loads no PKCS#11)
from tests.postgres_server import free_port, start_cluster  # noqa: E402

TARGET_RATIO = 0.50
TARGET_P99_MS = 25.0
IDENTITY = "ml-platform-ci@company.com"
SIGN_PATH = "/api/v1/signing-requests/"
TRIVIAL_PATH = "/bench/trivial/"


@dataclass
class Round:
    side: str
    requests: int
    seconds: float
    good: int
    bad: int
    errors: int
    p50_ms: float
    p99_ms: float
    first_bad: str
    samples: list[str]

    @property
    def rate(self) -> float:
        return self.good / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side (default 3)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--resources", type=int, default=4, help="files per signing request")
    parser.add_argument("--samples", type=int, default=50, help="bundles to fetch and verify")
    parser.add_argument(
        "--gunicorn-arg", action="append", default=[],
        help="extra gunicorn argument after the config file (repeat), e.g. --worker-class=gthread",
    )  # fmt: skip
    parser.add_argument(
        "--profile", metavar="DIR",
        help="also run py-spy (pip install py-spy) on every worker during one extra signing "
        "round; writes DIR/worker-PID.txt (collapsed stacks) and prints the top frames",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.connections <= 256 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--connections must be 1..256, --seconds > 0, --rounds >= 1")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: make deps, or apt-get install wrk (Debian package)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    cluster = gunicorn = None
    try:
        cluster = start_cluster()
        env = prepare(tmp, cluster.url)
        gunicorn, port = start_gunicorn(tmp, env, args.gunicorn_arg)
        results = drive(port, env, args)
        checked = check(port, env, results, args.samples)
        report(args, results, checked, gunicorn_args(args.gunicorn_arg))
        if args.profile:
            profile(port, env, args, Path(args.profile), tmp)
    finally:
        if gunicorn is not None:
            stop(gunicorn)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --- setup --------------------------------------------------------------------------------


def prepare(tmp: Path, database_url: str) -> dict[str, str]:
    """Token, key, API token and the environment gunicorn runs with."""
    conf = softhsm.write_conf(tmp / "softhsm")
    label, user_pin = f"bench-{secrets.token_hex(4)}", secrets.token_hex(8)
    softhsm.init_token(conf, label, secrets.token_hex(8), user_pin)
    pin_file = tmp / "user.pin"
    pin_file.write_text(user_pin + "\n")
    pin_file.chmod(0o600)
    (tmp / "static").mkdir()
    env = {
        "VAR_DIR": str(tmp),
        "SOFTHSM2_CONF": str(conf),
        "DATABASE_URL": database_url,
        "PKCS11_MODULE": softhsm.SOFTHSM_MODULE,
        "PKCS11_PIN_FILE": str(pin_file),
        "PKCS11_TOKEN_STAGING": label,
        "SIGNING_MODE": "inline",
        "MODELSIGN_ENV": "local",
        "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1",
    }
    os.environ.update(env)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # this process: metrics in memory
    os.environ["DJANGO_SETTINGS_MODULE"] = "signing_service.settings"
    import django

    django.setup()
    from django.core.management import call_command

    from keys.lifecycle import register_key
    from keys.registry import pkcs11_backend
    from signing_service.models import ApiToken

    call_command("migrate", verbosity=0)
    backend = pkcs11_backend("staging")
    generated = backend.generate(f"staging-{secrets.token_hex(4)}", "ECDSA-P256")
    register_key(
        "staging", backend, generated, algorithm="ECDSA-P256", validity=timedelta(days=90),
        actor="bench", activate=True,
    )  # fmt: skip
    _, token = ApiToken.issue(IDENTITY, ["staging"], None, "bench_api")
    env["BENCH_TOKEN"] = token
    return env


def gunicorn_args(extra: list[str]) -> list[str]:
    return ["-c", str(ROOT / "deploy" / "gunicorn.conf.py"), *extra]


def start_gunicorn(
    tmp: Path, env: dict[str, str], extra: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    # No PROMETHEUS_MULTIPROC_DIR: gunicorn.conf.py makes VAR_DIR/prometheus.
    child_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    child_env.update({k: v for k, v in env.items() if k != "BENCH_TOKEN"})
    child_env.update(
        DJANGO_SETTINGS_MODULE="bench_api_site",
        PYTHONPATH=os.pathsep.join([str(BENCH), str(ROOT)]),
    )
    log = tmp / "gunicorn.log"
    command = [
        sys.executable, "-m", "gunicorn", *gunicorn_args(extra),
        "--bind", f"127.0.0.1:{port}", "signing_service.wsgi",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=ROOT, env=child_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"gunicorn did not answer /healthz:\n{log.read_text(errors='replace')}")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: no server outlives the bench


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- load ---------------------------------------------------------------------------------


def wrk(port: int, env: dict[str, str], side: str, seconds: float, args: Any) -> Round:
    run = secrets.token_hex(4)
    wrk_env = os.environ | {
        "BENCH_MODE": side,
        "BENCH_RUN": run,
        "BENCH_PATH": SIGN_PATH if side == "sign" else TRIVIAL_PATH,
        "BENCH_TOKEN": env["BENCH_TOKEN"],
        "BENCH_RESOURCES": str(args.resources),
        "BENCH_SAMPLE_EVERY": "97",
    }
    command = [
        "wrk", "-t", str(min(args.wrk_threads, args.connections)), "-c", str(args.connections),
        "-d", f"{seconds:g}s", "--timeout", "10s", "-s", str(BENCH / "bench_api.lua"),
        f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    done = subprocess.run(command, env=wrk_env, capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    r = json.loads(line.removeprefix("RESULT "))
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return Round(
        side=side, requests=r["requests"], seconds=r["duration_us"] / 1e6, good=r["good"],
        bad=r["bad"], errors=errors, p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
        first_bad=r["first_bad"], samples=r["samples"],
    )  # fmt: skip


def drive(port: int, env: dict[str, str], args: Any) -> list[Round]:
    """A short warm-up of each side (discarded), then alternating rounds."""
    for side in ("trivial", "sign"):
        warm = wrk(port, env, side, 2, args)
        if warm.good == 0:
            raise SystemExit(f"warm-up of {side}: no good response; first bad: {warm.first_bad}")
    rounds = []
    for i in range(args.rounds):
        for side in ("trivial", "sign") if i % 2 == 0 else ("sign", "trivial"):
            r = wrk(port, env, side, args.seconds, args)
            print(
                f"  {side:7} {r.rate:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
                f"  bad {r.bad}  errors {r.errors}",
                flush=True,
            )
            rounds.append(r)
    return rounds


# --- checks -------------------------------------------------------------------------------


@dataclass
class Checked:
    bundles_verified: int
    requests_in_db: int
    signatures_in_db: int
    audit_entries: int


def check(port: int, env: dict[str, str], rounds: list[Round], samples: int) -> Checked:
    """Fail loudly unless what was counted as signed really was."""
    from keys.models import SigningKey
    from signing_service import audit
    from signing_service.bundle import load_public_key, payload_digest, verify_bundle
    from signing_service.models import RequestState, Signature, SigningRequest

    key = SigningKey.objects.get(authority="staging", state="active")
    public = load_public_key(key.public_key_pem)
    picked = [s for r in rounds if r.side == "sign" for s in r.samples][:samples]
    if not picked:
        raise SystemExit("no signed response was sampled")
    for sample in picked:
        request_id, version = sample.split(" ")
        url = f"http://127.0.0.1:{port}{SIGN_PATH}{request_id}/bundle"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {env['BENCH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback http)
            raw = resp.read()
        statement = verify_bundle(raw, public)
        meta = statement.service_metadata
        if (
            statement.model_name != "bench-model"
            or meta.get("request_id") != request_id
            or meta.get("model_version") != version
            or meta.get("key_hint") != key.hint
        ):
            raise SystemExit(f"bundle of {request_id} is for something else: {meta}")
        stored = Signature.objects.get(request_id=request_id)
        if stored.payload_digest != payload_digest(statement.payload):
            raise SystemExit(f"bundle of {request_id} is not the stored signature's")

    requests = SigningRequest.objects.filter(model_name="bench-model")
    unsigned = requests.exclude(state=RequestState.SIGNED).count()
    if unsigned:
        states = list(
            requests.exclude(state=RequestState.SIGNED).values_list(
                "state", "failure_reason", "waiting_reason"
            )[:5]
        )
        raise SystemExit(f"{unsigned} bench requests are not signed: {states}")
    total = requests.count()
    signatures = Signature.objects.filter(request__model_name="bench-model").count()
    if signatures != total:
        raise SystemExit(f"{total} requests but {signatures} signatures")
    counted = sum(r.good for r in rounds if r.side == "sign")
    if total < counted:
        raise SystemExit(f"wrk counted {counted} signed responses but only {total} exist")
    entries, problem = audit.verify_chain()
    if problem is not None:
        raise SystemExit(f"audit chain broken: {problem}")
    return Checked(len(picked), total, signatures, entries)


# --- report -------------------------------------------------------------------------------


def report(args: Any, rounds: list[Round], checked: Checked, gargs: list[str]) -> None:
    import django
    import gunicorn

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{os.cpu_count()} CPUs, load average {load}; Python {sys.version.split()[0]}, "
        f"Django {django.__version__}, gunicorn {gunicorn.__version__} {' '.join(gargs[2:])}; "
        f"PostgreSQL (fsync off), SoftHSM2; wrk -c {args.connections} "
        f"-t {min(args.wrk_threads, args.connections)}, {args.rounds} x {args.seconds:g} s per side, "
        f"{args.resources} files per request"
    )
    print("| side | req/s (median of rounds) | p50 | p99 | bad | socket errors |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for side, name in (("trivial", "trivial DRF endpoint"), ("sign", "POST signing-requests")):
        mine = [r for r in rounds if r.side == side]
        rate = statistics.median(r.rate for r in mine)
        p50 = statistics.median(r.p50_ms for r in mine)
        p99 = max(r.p99_ms for r in mine)
        medians[side] = (rate, p99)
        print(
            f"| {name} | {rate:,.0f} | {p50:.2f} ms | {p99:.2f} ms (worst round) "
            f"| {sum(r.bad for r in mine)} | {sum(r.errors for r in mine)} |"
        )
        for r in mine:
            if r.bad:
                print(f"  {side}: first bad response: {r.first_bad}")
                break
    ratio = medians["sign"][0] / medians["trivial"][0]
    print(
        f"signed / trivial: {ratio:.3f} (target >= {TARGET_RATIO:.2f}: "
        f"{'met' if ratio >= TARGET_RATIO else f'missed by {(TARGET_RATIO - ratio) * 100:.1f} points'})"
    )
    p99 = medians["sign"][1]
    print(
        f"signing p99: {p99:.2f} ms (target < {TARGET_P99_MS:.0f} ms: "
        f"{'met' if p99 < TARGET_P99_MS else 'missed'})"
    )
    print(
        f"checked: {checked.bundles_verified} sampled bundles verified with the staging key; "
        f"{checked.requests_in_db} bench requests, all signed, {checked.signatures_in_db} "
        f"signatures (one each); audit chain of {checked.audit_entries} entries verifies"
    )


# --- profile ------------------------------------------------------------------------------


def profile(port: int, env: dict[str, str], args: Any, out: Path, tmp: Path) -> None:
    """py-spy on every gunicorn worker during one more signing round; top frames."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    master = _gunicorn_master(tmp)
    workers = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    spies = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate",
             "500", "--format", "raw", "--output", str(out / f"worker-{pid}.txt"), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for pid in workers
    ]  # fmt: skip
    time.sleep(0.5)
    r = wrk(port, env, "sign", args.seconds, args)
    for s in spies:
        s.wait(60)
    print(f"\nprofiled signing round: {r.rate:,.0f} req/s (py-spy slows the workers)")
    _top(out)


def _gunicorn_master(tmp: Path) -> int:
    for line in (tmp / "gunicorn.log").read_text(errors="replace").splitlines():
        if "Listening at" in line or "Starting gunicorn" in line:
            start = line.find("[", line.find("]") + 1)
            if start != -1:
                return int(line[start + 1 : line.find("]", start)])
    raise SystemExit("cannot find the gunicorn master's pid in its log")


#: Frames whose inclusive share says where a signing request's time goes.
_OF_INTEREST = (
    "SyncWorker.handle_request", "ThreadWorker.handle", "SigningRequestCreateView.post",
    "submit", "_create_signed", "_signature_for", "SigningKeyQuerySet.active_for",
    "Pkcs11Backend.sign", "_check_signature", "record_each", "Model.save", "QuerySet.bulk_create",
    "ApiTokenAuthentication.authenticate", "BaseSerializer.is_valid",
    "SigningRequestSerializer.to_representation", "SQLCompiler.as_sql", "SQLInsertCompiler.as_sql",
    "SQLCompiler.execute_sql", "SQLInsertCompiler.execute_sql", "Cursor.execute",
)  # fmt: skip


def _top(out: Path, n: int = 15) -> None:
    """Inclusive share of samples of chosen frames, and the top own-time frames, from
    py-spy's raw (collapsed) stacks of every worker."""
    total, inclusive, own = 0, dict[str, int](), dict[str, int]()
    for path in out.glob("worker-*.txt"):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            names = []
            for frame in stack.split(";"):
                func, _, where = frame.partition(" (")
                where = where.rstrip(")").rsplit(":", 1)[0]
                names.append((func, where.split("site-packages/")[-1].split("/main/")[-1]))
            total += int(count)
            for func, _where in set(names):
                inclusive[func] = inclusive.get(func, 0) + int(count)
            if names:
                key = f"{names[-1][0]} ({names[-1][1]})"
                own[key] = own.get(key, 0) + int(count)
    if not total:
        print("py-spy recorded nothing (ptrace not permitted?)")
        return
    print(f"py-spy: {total} samples over the workers; share of samples inside:")
    for func in _OF_INTEREST:
        if func in inclusive:
            print(f"  {100 * inclusive[func] / total:5.1f}%  {func}")
    print("own time (top frames):")
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
