"""STANDS IN FOR `docker compose up`: the compose stack's entrypoint, end to end, on this host.

No container engine runs on the build machines, so this test runs what the compose file's
containers run, on the host: ``deploy/container/entrypoint.sh`` with each service's
environment read from ``deploy/compose/compose.yaml`` (container paths mapped to a temporary
directory, the ``postgres`` and ``redis`` hosts to a throwaway PostgreSQL cluster and a
redis-server on free loopback ports). Then it does what the README's Deployment section tells
a new operator to do: ``init``, two custodians set up their authenticators (over HTTP, like a
browser), a key ceremony for ``staging``, a CI token, ``modelsign sign``, and the reference
``model_signing verify key`` on the bundle.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from django_otp.oath import totp

from tests.fixtures_service import model_signing_verify, write_model
from tests.postgres_server import PostgresUnavailable, start_cluster
from tests.redis_fixtures import REDIS_SERVER, ROOT, _start_redis, _stop, free_port

pytestmark = [pytest.mark.slow, pytest.mark.softhsm, pytest.mark.interop]

ENTRYPOINT = ROOT / "deploy" / "container" / "entrypoint.sh"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"


class Stack:
    """The compose services' environments on this host, and the processes started from them."""

    def __init__(self, root: Path, database_url: str, redis_url: str) -> None:
        self.root = root
        self.compose = yaml.safe_load(COMPOSE.read_text())
        self.secrets = root / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.redis_url = redis_url
        self.procs: list[subprocess.Popen[bytes]] = []
        self._write_secrets()

    def _write_secrets(self) -> None:
        # What the README has the operator create under deploy/compose/secrets/.
        values = {
            "secret_key": secrets.token_urlsafe(64),
            "database_url": self.database_url,
            "hsm_user_pin": secrets.token_hex(8),
            "hsm_so_pin": secrets.token_hex(8),
            "audit_checkpoint_pin": secrets.token_hex(8),
            "metrics_token": secrets.token_urlsafe(32),
        }
        for name, value in values.items():
            path = self.secrets / name
            path.write_text(value + "\n")
            path.chmod(0o600)

    def env(self, service: str, **extra: str) -> dict[str, str]:
        """The service's compose environment with container paths mapped to this host."""
        declared = self.compose["services"][service]["environment"]
        mapping = {
            "/run/secrets/": f"{self.secrets}/",
            "/etc/modelsign/policy.yaml": str(COMPOSE.parent / "policy.yaml"),
            "/var/lib/modelsign": str(self.root / "var"),
            "/tmp/prometheus": str(self.root / f"prometheus-{service}"),
        }
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        for name, value in declared.items():
            value = str(value).replace("${MODELSIGN_HOSTNAME:-localhost}", "localhost")
            for container, host in mapping.items():
                value = value.replace(container, host)
            env[name] = value
        env["REDIS_URL"] = self.redis_url
        if "BIND" in env:
            env["BIND"] = f"127.0.0.1:{self.port}"
            env["WEB_CONCURRENCY"] = "2"  # this machine's cores, not a server's
        if "WORKER_METRICS_LISTEN" in env:
            env["WORKER_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
        # The image's own ENV (Dockerfile) and what a root test run needs (celery refuses root).
        env |= {"PYTHON": sys.executable, "APP_DIR": str(ROOT), "C_FORCE_ROOT": "1"}
        env |= {"ROLE_FILE": str(self.root / f"role-{service}"), **extra}
        return env

    def run(self, service: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [str(ENTRYPOINT), *args], env=self.env(service), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"entrypoint.sh {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def start(self, service: str, role: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{service}.log").open("wb")
        proc = subprocess.Popen(
            [str(ENTRYPOINT), role], env=self.env(service), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, service: str) -> str:
        return (self.root / f"{service}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc, timeout=15)


class Browser:
    """Just enough of a browser for the login and authenticator pages (cookies by hand:
    the production posture marks them Secure, which ``http.cookiejar`` keeps from http)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Host": "localhost"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            form = {"csrfmiddlewaretoken": self.cookies.get("csrftoken", ""), **form}
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        for header, value in answer.getheaders():
            if header.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                self.cookies[name.strip()] = rest.split(";", 1)[0]
        text = answer.read().decode(errors="replace")
        conn.close()
        return answer.status, text


def enrol_authenticator(port: int, username: str, password: str) -> bytes:
    """Log in and set up the authenticator like a person would; return the TOTP key."""
    browser = Browser(port)
    assert browser.request("GET", "/login/")[0] == 200
    status, _ = browser.request("POST", "/login/", {"username": username, "password": password})
    assert status == 302, f"login as {username} failed ({status})"
    status, page = browser.request("GET", "/account/authenticator/")
    assert status == 200, page[:500]
    secret = re.search(r'id="totp-secret">([A-Z2-7]+)<', page)
    assert secret, "the authenticator page shows no key"
    b32 = secret.group(1)
    key = base64.b32decode(b32 + "=" * (-len(b32) % 8))
    status, page = browser.request("POST", "/account/authenticator/", {"otp_token": code(key)})
    assert status == 302, f"authenticator set-up refused for {username}: {page[:500]}"
    return key


def code(key: bytes, *, steps_ahead: int = 0) -> str:
    # A code is accepted once per device; the next 30 s step is within the device's tolerance.
    return f"{totp(key, drift=steps_ahead):06d}"


def wait_http(port: int, path: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path, headers={"Host": "localhost"})
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return status
        except OSError:
            pass
        time.sleep(0.2)
    return status


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    if not Path(REDIS_SERVER).exists():
        pytest.fail(f"{REDIS_SERVER} is required (apt-get install redis-server)")
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL server binaries are required (apt-get install postgresql): {exc}")
    (tmp_path / "redis").mkdir()
    redis, redis_port = _start_redis(tmp_path / "redis")
    running = Stack(tmp_path, cluster.url, f"redis://127.0.0.1:{redis_port}/0")
    try:
        yield running
    finally:
        running.stop()
        _stop(redis, timeout=5)
        cluster.stop()


def test_compose_stack_signs_a_model_that_model_signing_verifies(
    stack: Stack, tmp_path: Path
) -> None:
    started = time.monotonic()
    init_out = stack.run("init", "init")
    assert "token 'modelsign-staging' (authority staging): created" in init_out
    assert "audit checkpoint key" in init_out
    web = stack.start("web", "web")
    worker = stack.start("worker", "worker")
    # A second `up` runs init again (here beside the rest): it must change nothing and succeed.
    again = subprocess.Popen(
        [str(ENTRYPOINT), "init"], env=stack.env("init"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    passwords = {}
    for name in ("kim", "lee"):
        passwords[name] = stack.root / f"{name}.password"
        passwords[name].write_text(secrets.token_urlsafe(16))
        stack.run("init", "manage", "create_user", name, "--email", f"{name}@company.com",
                  "--custodian", "staging", "--password-file", str(passwords[name]))  # fmt: skip

    assert wait_http(stack.port, "/healthz", [web], 30) == 200, stack.log("web")
    keys = {n: enrol_authenticator(stack.port, n, p.read_text()) for n, p in passwords.items()}

    second_init = again.communicate(timeout=120)[0]
    assert again.returncode == 0, second_init
    assert "exists, PIN file opens it" in second_init and "created" not in second_init

    opened = stack.run("init", "manage", "key_ceremony", "open", "--authority", "staging",
                       "--user", "kim", "--otp", code(keys["kim"], steps_ahead=1))  # fmt: skip
    ceremony = re.search(r"ceremony ([0-9a-f-]{36}) for staging", opened)
    assert ceremony, opened
    done = stack.run("init", "manage", "key_ceremony", "confirm", ceremony.group(1),
                     "--user", "lee", "--otp", code(keys["lee"], steps_ahead=1))  # fmt: skip
    assert "new active key" in done, done

    token = stack.run("init", "manage", "create_api_token", "ml-platform-ci@company.com",
                      "--authority", "staging").strip()  # fmt: skip
    assert wait_http(stack.port, "/readyz", [web, worker], 30) == 200, stack.log("web")
    # What the image's HEALTHCHECK and the worker's liveness probe run, beside the signing.
    worker_health = subprocess.Popen(
        [str(ENTRYPOINT), "healthcheck"], env=stack.env("worker"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    stack.run("web", "healthcheck")

    model = write_model(tmp_path / "my-model", {"config.json": b'{"layers": 2}',
                                                "weights/part-0.bin": os.urandom(4096)})  # fmt: skip
    signature, pem = tmp_path / "model.sig", tmp_path / "staging.pem"
    client = [sys.executable, "-m", "signing_service.client"]
    signed = subprocess.run(
        [*client, "sign", str(model), "--server", stack.base, "--environment", "staging",
         "--token", token, "--out", str(signature), "--timeout", "60"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert signed.returncode == 0, f"{signed.stdout}\n{signed.stderr}\n{stack.log('worker')}"
    fetched = subprocess.run(
        [*client, "public-key", "--server", stack.base, "--signature", str(signature),
         "--out", str(pem)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    verified = model_signing_verify(model, signature, pem)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # The worker signed it (SIGNING_MODE=worker, as composed), not the web process.
    assert "sign_request" in stack.log("worker"), stack.log("worker")
    (model / "config.json").write_bytes(b'{"layers": 3}')
    assert model_signing_verify(model, signature, pem).returncode != 0
    assert worker_health.wait(60) == 0, worker_health.communicate()[0]
    print(f"compose stand-in: signed and verified in {time.monotonic() - started:.1f} s")


def test_entrypoint_refuses_an_unknown_role(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ENTRYPOINT), "webserver"], capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": os.environ["PATH"], "PYTHON": sys.executable, "ROLE_FILE": str(tmp_path / "r")},
    )  # fmt: skip
    assert done.returncode == 64
    assert "unknown role: webserver" in done.stderr
