"""`modelsign sign --oidc`: the CI job's ID token, read the way each CI provides it.

GitHub Actions is faked by a loopback server playing ACTIONS_ID_TOKEN_REQUEST_URL; the
end-to-end test has it mint tokens from the local test issuer, and the live service
verifies them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from signing_service.client import ci_oidc, cli
from signing_service.models import SigningRequest
from tests.fixtures_service import model_signing_verify, write_model
from tests.oidc_issuer import AUDIENCE, Issuer, OidcService

REQUEST_TOKEN = "ghs_runtime-request-token"


def fake_jwt(exp: float) -> str:
    from tests.oidc_issuer import b64json

    return f"{b64json({'alg': 'RS256'})}.{b64json({'exp': int(exp)})}.c2ln"


@dataclass
class FakeGitHub:
    """ACTIONS_ID_TOKEN_REQUEST_URL: checks the bearer, answers {"value": mint(audience)}."""

    mint: Callable[[str], str]
    status: int = 200
    audiences: list[str] = field(default_factory=list)
    url: str = ""

    def handle(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        if authorization != f"bearer {REQUEST_TOKEN}":
            return 401, {"message": "bad credentials"}
        if self.status != 200:
            return self.status, {"message": "no"}
        query = parse_qs(urlsplit(path).query)
        assert query["api-version"] == ["2.0"]  # the runner's own query is kept
        audience = query["audience"][0]
        self.audiences.append(audience)
        return 200, {"count": 1, "value": self.mint(audience)}


@pytest.fixture
def fake_github() -> Iterator[Callable[[Callable[[str], str]], FakeGitHub]]:
    servers: list[ThreadingHTTPServer] = []

    def start(mint: Callable[[str], str]) -> FakeGitHub:
        fake = FakeGitHub(mint)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, body = fake.handle(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        fake.url = f"http://127.0.0.1:{server.server_address[1]}/_apis/token?api-version=2.0"
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def github_env(fake: FakeGitHub) -> dict[str, str]:
    return {
        "GITHUB_ACTIONS": "true",
        "ACTIONS_ID_TOKEN_REQUEST_URL": fake.url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
    }


# --- where the token comes from --------------------------------------------------------


def test_on_github_it_requests_a_token_for_the_audience(fake_github: Any) -> None:
    fake = fake_github(lambda aud: fake_jwt(time.time() + 300))
    source = ci_oidc.token_source(audience="https://sign.example.com/x", env=github_env(fake))
    first = source()
    assert source() == first  # still fresh: reused
    assert fake.audiences == ["https://sign.example.com/x"]


def test_on_github_a_token_about_to_expire_is_replaced(fake_github: Any) -> None:
    fake = fake_github(lambda aud: fake_jwt(time.time() + 30))
    source = ci_oidc.token_source(audience=AUDIENCE, env=github_env(fake))
    source()
    source()
    assert len(fake.audiences) >= 2  # each token was within a minute of expiring


def test_on_github_a_refused_request_says_what_to_add(fake_github: Any) -> None:
    fake = fake_github(lambda aud: "unused")
    fake.status = 403
    with pytest.raises(ci_oidc.CiTokenError, match=r"HTTP 403.*id-token: write"):
        ci_oidc.token_source(audience=AUDIENCE, env=github_env(fake))


def test_on_github_without_id_token_permission_it_says_so() -> None:
    with pytest.raises(ci_oidc.CiTokenError, match=r"permissions: id-token: write"):
        ci_oidc.token_source(audience=AUDIENCE, env={"GITHUB_ACTIONS": "true"})


def test_on_gitlab_it_reads_the_id_tokens_variable() -> None:
    token = fake_jwt(time.time() + 300)
    env = {"GITLAB_CI": "true", "SIGNING_ID_TOKEN": token}
    assert ci_oidc.token_source(audience=AUDIENCE, env=env, token_env="SIGNING_ID_TOKEN")() == token


def test_on_gitlab_without_the_variable_it_shows_the_id_tokens_block() -> None:
    with pytest.raises(ci_oidc.CiTokenError, match=r"id_tokens: MODELSIGN_ID_TOKEN: aud: https"):
        ci_oidc.token_source(audience=AUDIENCE, env={"GITLAB_CI": "true"})


def test_a_token_file_wins(tmp_path: Path) -> None:
    token = fake_jwt(time.time() + 300)
    (tmp_path / "token").write_text(token + "\n")
    source = ci_oidc.token_source(
        audience=AUDIENCE, env={"MODELSIGN_ID_TOKEN": "x.y.z"}, token_file=str(tmp_path / "token")
    )
    assert source() == token


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no CI ID token here"),
        ({"MODELSIGN_ID_TOKEN": "not-a-jwt"}, r"\$MODELSIGN_ID_TOKEN does not hold a JWT"),
        (
            {
                "ACTIONS_ID_TOKEN_REQUEST_URL": "http://example.com/t",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "x",
            },
            "must be https",
        ),
    ],
)
def test_it_explains_when_there_is_no_usable_token(env: dict[str, str], message: str) -> None:
    with pytest.raises(ci_oidc.CiTokenError, match=message):
        ci_oidc.token_source(audience=AUDIENCE, env=env)


def test_the_cli_fails_clearly_outside_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in (
        "GITHUB_ACTIONS",
        "GITLAB_CI",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "MODELSIGN_ID_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    model = write_model(tmp_path / "m", {"w.bin": b"w"})
    code = cli.main(["sign", str(model), "--server", "http://127.0.0.1:9", "--environment",
                     "staging", "--oidc"])  # fmt: skip
    assert code == cli.EXIT_ERROR
    assert "modelsign: error: --oidc: no CI ID token here" in capsys.readouterr().err


def test_oidc_options_need_oidc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path / "m", {"w.bin": b"w"})
    code = cli.main(["sign", str(model), "--server", "http://127.0.0.1:9", "--environment",
                     "staging", "--token", "mst_x", "--oidc-audience", "a"])  # fmt: skip
    assert code == cli.EXIT_ERROR
    assert "--oidc-audience and --oidc-token-file need --oidc" in capsys.readouterr().err
    code = cli.main(["sign", str(model), "--server", "http://127.0.0.1:9", "--environment",
                     "staging", "--token", "mst_x", "--oidc"])  # fmt: skip
    assert code == cli.EXIT_ERROR
    assert "not allowed with argument" in capsys.readouterr().err


# --- end to end: GitHub Actions job -> live service -> bundle ---------------------------


@pytest.mark.softhsm
@pytest.mark.interop
@pytest.mark.django_db(transaction=True)
def test_modelsign_sign_oidc_on_github_actions_signs_a_model(
    live_server: Any,
    oidc_service: OidcService,
    active_keys: Any,
    fake_github: Any,
    tmp_path: Path,
) -> None:
    issuer: Issuer = oidc_service.github

    def mint(audience: str) -> str:
        return issuer.token(oidc_service.github_claims(aud=audience, actor="octocat"))

    fake = fake_github(mint)
    model = write_model(tmp_path / "resnet", {"model.bin": os.urandom(4096), "config.json": b"{}"})
    out = tmp_path / "model.sig"
    env = {**os.environ, **github_env(fake), "GITHUB_REPOSITORY": "acme/models"}
    result = subprocess.run(
        [sys.executable, "-m", "signing_service.client", "sign", str(model),
         "--server", live_server.url, "--environment", "staging", "--oidc",
         "--oidc-audience", AUDIENCE, "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fake.audiences and set(fake.audiences) == {AUDIENCE}
    req = SigningRequest.objects.get()
    assert (req.state, req.requester, req.actor) == (
        "signed", "repo:acme/models:environment:staging", "octocat"
    )  # fmt: skip
    pem = tmp_path / "staging.pem"
    pem.write_text(active_keys["staging"].public_key_pem)
    verified = model_signing_verify(model, out, pem)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # Later in the pipeline, the same job identity fetches the newest valid bundle (this is
    # how it picks up a re-signed one) with a fresh ID token, no API token anywhere.
    fetched = tmp_path / "fetched.sig"
    result = subprocess.run(
        [sys.executable, "-m", "signing_service.client", "fetch", "--server", live_server.url,
         "--oidc", "--oidc-audience", AUDIENCE, "--model", "resnet",
         "--model-version", req.model_version, "--out", str(fetched)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fetched.read_bytes() == out.read_bytes()
    assert len(fake.audiences) == 2  # the fetch asked the CI for its own ID token


@pytest.mark.softhsm
@pytest.mark.django_db(transaction=True)
def test_the_default_audience_is_the_server_url(
    live_server: Any, oidc_service: OidcService, active_keys: Any, fake_github: Any, tmp_path: Path
) -> None:
    issuer = oidc_service.github
    fake = fake_github(lambda aud: issuer.token(oidc_service.github_claims(aud=aud)))
    model = write_model(tmp_path / "m", {"w.bin": b"weights"})
    result = subprocess.run(
        [sys.executable, "-m", "signing_service.client", "sign", str(model),
         "--server", live_server.url + "/", "--environment", "staging", "--oidc",
         "--out", str(tmp_path / "m.sig"), "--quiet"],
        env={**os.environ, **github_env(fake)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # The service's audience is https://sign.test, so a token for the server URL is refused.
    assert fake.audiences == [live_server.url]
    assert result.returncode == 1
    assert "oidc_wrong_audience" in result.stderr
    assert SigningRequest.objects.count() == 0
