"""`modelsign sign` and `public-key` against a small fake of the service's REST API.

The fake signs with an in-memory EC key through signing_service.bundle, so the written
bundle is also checked with `modelsign verify` and the reference model_signing CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signing_service import bundle as fmt
from signing_service.client import api, cli
from signing_service.client.hashing import hash_model
from signing_service.manifest import Resource

TOKEN = "s3cret-token-value"
BASE = "/api/v1/signing-requests/"
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


@dataclass
class Fake:
    """Scripted service: what the POST answers, and how many polls until the end state."""

    first_state: str = "signed"
    end_state: str = "signed"
    polls_to_end: int = 0
    post_failures: list[int] = field(default_factory=list)
    post_error: tuple[int, dict[str, Any]] | None = None
    other_content: bool = False
    failure_reason: str | None = None
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    posts: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls: int = 0
    url: str = ""

    def view(self, rid: str) -> dict[str, Any]:
        req = self.requests[rid]
        waiting = req["state"] == "pending_approval"
        return {
            "id": rid,
            "state": req["state"],
            "statement_digest": "0" * 64,
            "links": {
                "self": f"{self.url}{BASE}{rid}/",
                "bundle": f"{self.url}{BASE}{rid}/bundle",
                "approval_page": f"{self.url}/approvals/{rid}/" if waiting else None,
            },
            "approvals": {"required": 2, "received": min(self.polls, 2) if waiting else 2},
            "failure_reason": self.failure_reason if req["state"] != "signed" else None,
        }

    def bundle(self, rid: str) -> bytes:
        body = self.requests[rid]["body"]
        resources = [Resource(**r) for r in body["resources"]]
        if self.other_content:
            resources[0] = Resource(resources[0].name, "f" * 64)
        statement = fmt.build_statement(body["model"], resources, ignore_paths=body["ignore_paths"])
        payload = fmt.statement_payload(statement)
        signature = self.key.sign(fmt.pae(payload), ec.ECDSA(fmt.curve_hash(self.key.public_key())))
        hint = fmt.key_hint(self.key.public_key())
        return fmt.bundle_bytes(fmt.build_bundle(payload, signature, hint=hint))

    def keys(self) -> dict[str, Any]:
        public = self.key.public_key()
        entry = {
            "id": "k1",
            "authority": "staging",
            "algorithm": "ecdsa-p256-sha256",
            "hint": fmt.key_hint(public),
            "public_key_pem": fmt.public_key_pem(public),
            "state": "active",
            "not_before": None,
            "not_after": None,
            "backend": "memory",
        }
        retired = {**entry, "id": "k0", "state": "retired", "hint": "0" * 64}
        return {"count": 2, "results": [retired, entry]}


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def send(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, code: str, message: str) -> None:
            self.send(status, {"error": {"code": code, "message": message, "details": None}})

        def authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                return True
            self.error(401, "not_authenticated", "a valid API token is required")
            return False

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.posts.append((dict(self.headers), body))
            if not self.authorized():
                return
            if fake.post_failures:
                return self.error(fake.post_failures.pop(0), "unavailable", "try again")
            if fake.post_error:
                return self.send(*fake.post_error)
            rid = self.headers["Idempotency-Key"]  # one request per key, like the service
            status = 200 if rid in fake.requests else 201
            fake.requests.setdefault(rid, {"state": fake.first_state, "body": body})
            self.send(status, fake.view(rid))

        def do_GET(self) -> None:
            if self.path == "/api/v1/keys/":
                return self.send(200, fake.keys())
            if not self.authorized():
                return
            rid, _, rest = self.path.removeprefix(BASE).partition("/")
            if rid not in fake.requests:
                return self.error(404, "not_found", "no such request")
            req = fake.requests[rid]
            if rest == "bundle":
                if req["state"] != "signed":
                    return self.error(409, "not_signed", "not signed yet")
                return self.send(200, fake.bundle(rid), fmt.BUNDLE_MEDIA_TYPE)
            fake.polls += 1
            if fake.polls >= fake.polls_to_end:
                req["state"] = fake.end_state
            self.send(200, fake.view(rid))

    return Handler


@pytest.fixture
def fake() -> Iterator[Fake]:
    service = Fake()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(service))
    service.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield service
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CI variables from the machine running the tests; fast polling and retries."""
    for name in list(os.environ):
        if name.startswith(("GITHUB_", "CI_", "GITLAB_")) or name in ("MODEL_VERSION", "CI"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MODELSIGN_TOKEN", TOKEN)
    monkeypatch.setattr(cli, "POLL_START", 0.01)
    monkeypatch.setattr(cli, "POLL_MAX", 0.02)
    monkeypatch.setattr(api, "DEFAULT_BACKOFF", 0.01)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "my-model"
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(b"\x01\x02" * 5000)
    (root / "sub" / "config.json").write_text('{"a": 1}')
    (root / ".gitignore").write_text("*.tmp\n")
    return root


def sign(fake: Fake, model: Path, out: Path, *extra: str) -> int:
    argv = ["sign", str(model), "--server", fake.url, "--environment", "staging"]
    return cli.main([*argv, "--out", str(out), "--quiet", *extra])


def public_pem(fake: Fake, tmp_path: Path) -> Path:
    path = tmp_path / "service.pub"
    path.write_text(fmt.public_key_pem(fake.key.public_key()))
    return path


def test_immediately_signed(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.sig"
    assert sign(fake, model, out) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert TOKEN not in captured.out + captured.err
    ((headers, body),) = fake.posts
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert uuid.UUID(headers["Idempotency-Key"]).version == 4
    expected = hash_model(model)
    assert body == {
        "model": "my-model",
        "version": expected.root_digest[:12],
        "environment": "staging",
        "resources": [r.to_json() for r in expected.resources],
        "ignore_paths": [".git", ".gitattributes", ".github", ".gitignore"],
    }
    written = json.loads(out.read_bytes())  # what the fake served (ECDSA is randomised)
    served = json.loads(fake.bundle(headers["Idempotency-Key"]))
    assert written["dsseEnvelope"]["payload"] == served["dsseEnvelope"]["payload"]
    pub = public_pem(fake, tmp_path)
    assert cli.main(["verify", str(model), "--signature", str(out), "--public-key", str(pub)]) == 0


@pytest.mark.interop
def test_bundle_inside_model_verifies_with_model_signing(
    fake: Fake, model: Path, tmp_path: Path
) -> None:
    out = model / "model.sig"
    assert sign(fake, model, out, "--model-name", "m", "--model-version", "1.2") == 0
    ((_, body),) = fake.posts
    assert "model.sig" in body["ignore_paths"] and (body["model"], body["version"]) == ("m", "1.2")
    args = [str(MODEL_SIGNING), "verify", "key", str(model), "--signature", str(out)]
    args += ["--public_key", str(public_pem(fake, tmp_path))]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_metadata_github(
    fake: Fake, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    github = {
        "GITHUB_REPOSITORY": "acme/models",
        "GITHUB_SHA": "abc123",
        "GITHUB_REF": "refs/heads/main",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_RUN_ID": "42",
        "GITHUB_ACTOR": "octocat",
    }
    for name, value in github.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MODEL_VERSION", "2024.1")
    assert sign(fake, model, tmp_path / "model.sig") == 0
    ((_, body),) = fake.posts
    assert body["version"] == "2024.1"
    assert body["ci"] == {
        "repository": "acme/models",
        "commit": "abc123",
        "ref": "refs/heads/main",
        "pipeline_url": "https://github.com/acme/models/actions/runs/42",
        "actor": "octocat",
    }


def test_ci_metadata_gitlab_partial() -> None:
    env = {"CI_PROJECT_PATH": "g/p", "CI_COMMIT_SHA": "def", "CI_PIPELINE_URL": "https://gl/p/1"}
    assert cli.ci_metadata(env) == {
        "repository": "g/p",
        "commit": "def",
        "pipeline_url": "https://gl/p/1",
    }
    assert cli.ci_metadata({}) == {}


def test_pending_then_signed_after_two_polls(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.first_state, fake.polls_to_end = "pending_approval", 2
    out = tmp_path / "model.sig"
    argv = ["sign", str(model), "--server", fake.url, "--environment", "staging"]
    assert cli.main([*argv, "--out", str(out)]) == 0  # not quiet: status lines in the log
    assert fake.polls == 2
    err = capsys.readouterr().err
    rid = next(iter(fake.requests))
    assert f"approval needed: {fake.url}/approvals/{rid}/" in err
    assert "pending_approval (approvals 0/2)" in err and "hashing 2 files" in err
    assert out.exists()


def test_rejected_exits_2(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.first_state, fake.end_state, fake.polls_to_end = "pending_approval", "rejected", 1
    fake.failure_reason = "rejected by alice: wrong dataset"
    out = tmp_path / "model.sig"
    assert sign(fake, model, out) == 2
    assert "was rejected: rejected by alice: wrong dataset" in capsys.readouterr().err
    assert not out.exists()


def test_failed_exits_1(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.first_state, fake.end_state = "signing", "failed"
    fake.failure_reason = "HSM unavailable"
    assert sign(fake, model, tmp_path / "model.sig") == 1
    assert "failed: HSM unavailable" in capsys.readouterr().err


def test_server_error_message(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "token ci@acme may not sign for environment 'staging'"
    fake.post_error = (403, {"error": {"code": "forbidden", "message": message, "details": None}})
    out = tmp_path / "model.sig"
    assert sign(fake, model, out) == 1
    err = capsys.readouterr().err
    assert f"modelsign: error: {message} (HTTP 403, forbidden)" in err
    assert "Traceback" not in err and not out.exists()


def test_bad_token_message(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token\n")
    assert sign(fake, model, tmp_path / "model.sig", "--token-file", str(token_file)) == 1
    err = capsys.readouterr().err
    assert "a valid API token is required (HTTP 401" in err and "wrong-token" not in err


def test_retry_on_503_reuses_idempotency_key(fake: Fake, model: Path, tmp_path: Path) -> None:
    fake.post_failures = [503]
    assert sign(fake, model, tmp_path / "model.sig") == 0
    keys = [headers["Idempotency-Key"] for headers, _ in fake.posts]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert len(fake.requests) == 1


def test_gives_up_after_repeated_503(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.post_failures = [503] * 10
    assert sign(fake, model, tmp_path / "model.sig") == 1
    assert len(fake.posts) == api.DEFAULT_RETRIES + 1
    assert "try again (HTTP 503, unavailable)" in capsys.readouterr().err


def test_bundle_for_other_content_is_not_written(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.other_content = True
    out = tmp_path / "model.sig"
    assert sign(fake, model, out) == 1
    assert "bundle for different content" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == []


def test_timeout_while_pending(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.first_state, fake.end_state = "pending_approval", "pending_approval"
    assert sign(fake, model, tmp_path / "model.sig", "--timeout", "0.2") == 1
    assert "timed out after 0.2 s" in capsys.readouterr().err


def test_unreachable_server(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sign", str(model), "--server", "http://127.0.0.1:9", "--environment", "staging"]
    assert cli.main([*argv, "--out", str(tmp_path / "x.sig"), "--quiet"]) == 1
    assert "cannot reach http://127.0.0.1:9/api/v1/signing-requests/" in capsys.readouterr().err


def test_out_directory_must_exist(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sign(fake, model, tmp_path / "no-such-dir" / "model.sig") == 1
    assert "does not exist" in capsys.readouterr().err and fake.posts == []


def test_missing_token(
    fake: Fake, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.delenv("MODELSIGN_TOKEN")
    assert sign(fake, model, tmp_path / "model.sig") == 1
    assert "no API token" in capsys.readouterr().err and fake.posts == []


def test_link_to_other_server_is_refused() -> None:
    client = api.ServiceClient("https://sign.example.com", TOKEN)
    assert client.url("/api/v1/x/") == "https://sign.example.com/api/v1/x/"
    with pytest.raises(api.ClientError, match="another server"):
        client.url("https://evil.example.net/api/v1/x/")
    assert TOKEN not in repr(client)


def test_public_key_by_environment_and_by_signature(
    fake: Fake, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = fmt.public_key_pem(fake.key.public_key())
    assert cli.main(["public-key", "--server", fake.url, "--environment", "staging"]) == 0
    assert capsys.readouterr().out == expected
    out = tmp_path / "model.sig"
    assert sign(fake, model, out) == 0
    key_file = tmp_path / "key.pem"
    argv = ["public-key", "--server", fake.url, "--signature", str(out), "--out", str(key_file)]
    assert cli.main(argv) == 0
    assert key_file.read_text() == expected
    assert cli.main(["public-key", "--server", fake.url, "--environment", "prod"]) == 1
    assert "no key(s) matching an active key for environment 'prod'" in capsys.readouterr().err
