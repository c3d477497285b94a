"""`make demo`: a CI job signs a model for production, two people approve, anyone verifies.

Every step goes through the real interfaces: gunicorn serving the service, the `modelsign`
client as a CI job runs it, the approval API with a session, CSRF and a TOTP code per
approver, and the reference `model_signing` verifier. Local only: it gives the demo users
an authenticator device directly in the database, which a real deployment never does.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VAR = Path(os.environ.get("VAR_DIR", ROOT / "var"))
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manage(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "signing_service.wsgi:application", "-c", str(ROOT / "deploy/gunicorn.conf.py"),
         "--bind", f"127.0.0.1:{port}", "--access-logfile", "/dev/null"],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the service did not start")


def make_model(path: Path) -> Path:
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(os.urandom(8 * 1024 * 1024))
    (path / "config.json").write_text('{"architectures": ["DemoModel"]}\n')
    (path / "tokenizer" / "vocab.json").write_text('{"hello": 0}\n')
    return path


def totp_code(username: str) -> str:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django_otp.oath import TOTP
    from django_otp.plugins.otp_totp.models import TOTPDevice

    user = get_user_model().objects.get(username=username)
    device = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="demo authenticator", confirmed=True)
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():0{device.digits}d}"


def approve(base: str, username: str, password: str, request_id: str) -> dict[str, object]:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{base}/login/")
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf}
    )
    opener.open(
        urllib.request.Request(  # noqa: S310 - loopback http only
            f"{base}/login/", form.encode(), headers={"Referer": f"{base}/login/"}
        )
    )
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    body = json.dumps({"decision": "approve", "comment": "demo", "otp_token": totp_code(username)})
    request = urllib.request.Request(  # noqa: S310 - loopback http only
        f"{base}/api/v1/signing-requests/{request_id}/approvals/", body.encode(),
        headers={"Content-Type": "application/json", "X-CSRFToken": csrf, "Referer": f"{base}/"},
    )  # fmt: skip
    return json.loads(opener.open(request).read())


def verify(model: Path, sig: Path, pem: Path) -> bool:
    result = subprocess.run(
        [str(BIN / "model_signing"), "verify", "key", str(model), "--signature", str(sig), "--public_key", str(pem)],
        capture_output=True, text=True,
    )  # fmt: skip
    print("   ", (result.stdout + result.stderr).strip().splitlines()[-1])
    return result.returncode == 0


def main() -> None:
    demo = VAR / "demo"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logins = dict(line.split(" ", 1) for line in (VAR / "demo-logins.txt").read_text().splitlines())
    step(f"starting the service on {base}")
    server = start_server(port)
    try:
        step("CI: a token for ml-platform-ci@company.com, scoped to production")
        token = manage(
            "create_api_token",
            "ml-platform-ci@company.com",
            "--authority",
            "production",
            "--expires-days",
            "1",
        )
        model = make_model(demo / "demo-model")
        sig = demo / "model.sig"
        step("CI: modelsign sign ./demo-model --environment production (waits for two approvals)")
        client = subprocess.Popen(
            [str(BIN / "modelsign"), "sign", str(model), "--server", base, "--environment", "production",
             "--token", token, "--out", str(sig), "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        request_id = wait_for_request_id(client)
        for name in ("alice", "bob"):
            step(f"approver {name}: log in, approve with an authenticator code")
            state = approve(base, name, logins[name], request_id)
            print(
                f"    request is now {state['state']} ({state['approvals']['received']} of {state['approvals']['required']} approvals)"
            )  # type: ignore[index]
        output, _ = client.communicate(timeout=120)
        print("    " + output.strip().replace("\n", "\n    "))
        if client.returncode != 0:
            raise SystemExit("the CI client did not get a signature")
        step("deployer: fetch the public key and verify with the reference verifier, model_signing")
        pem = demo / "production.pem"
        subprocess.run(
            [
                str(BIN / "modelsign"),
                "public-key",
                "--server",
                base,
                "--signature",
                str(sig),
                "--out",
                str(pem),
            ],
            check=True,
        )
        ok = verify(model, sig, pem)
        step("attacker: change one byte of the weights; verification must now fail")
        weights = model / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[1000] ^= 1
        weights.write_bytes(bytes(data))
        tampered_rejected = not verify(model, sig, pem)
        print("\nDemo", "PASSED" if ok and tampered_rejected else "FAILED")
        sys.exit(0 if ok and tampered_rejected else 1)
    finally:
        server.terminate()
        server.wait(timeout=10)


def wait_for_request_id(client: subprocess.Popen[str]) -> str:
    assert client.stdout is not None
    for line in client.stdout:
        print("    " + line.rstrip())
        found = re.search(r"/requests/([0-9a-f-]{36})/", line)
        if found:
            return found.group(1)
    raise SystemExit("the client exited before printing the approval page")


if __name__ == "__main__":
    main()
