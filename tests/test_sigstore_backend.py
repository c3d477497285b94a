"""Offline tests of the Sigstore keyless signer (keys/backends/sigstore_keyless.py).

There is no Fulcio, Rekor, OIDC provider or TUF repository here, and no network beyond
loopback. What these tests show, and how:

* identity extraction: sigstore's ``IdentityToken`` decodes the JWT WITHOUT checking its
  signature (by design: Fulcio checks it). It does check ``aud`` (== client id,
  ``sigstore``), ``exp``/``nbf``/``iat`` (5 s leeway) and the presence of ``aud``,
  ``sub``, ``iat``, ``exp``, ``iss``. So tokens are minted locally with an HMAC key
  nobody trusts, which also proves ``identity_of`` is no authentication step;
* the trust config: a real ``ClientTrustConfig`` JSON built here (locally generated CA,
  Rekor and CT keys, 127.0.0.1 URLs) is loaded and turned into a ``SigningContext``;
* failures: Fulcio on a closed loopback port, and on a port that accepts but never
  answers (black hole), must give ``BackendUnavailable`` naming the service, quickly;
* the Rekor half and the bundle assembly: Fulcio is replaced by a stub that issues a
  locally made certificate (``Signer._signing_cert``, sigstore-internal), because a
  fake Fulcio would need a CT log's embedded SCT. Rekor is then either a closed port
  (error names Rekor) or a loopback fake Rekor v1 that echoes a structurally valid entry
  with a made-up inclusion proof and SET. The bundle that comes out is checked for shape,
  payload and ECDSA signature only: it is NOT a verifiable Sigstore bundle and is never
  given to ``model_signing verify sigstore``.

Not tested here (needs a live Fulcio/Rekor): a real Fulcio certificate and SCT, a real
Rekor entry and inclusion proof, TUF download of the public-good trust config, and
``model_signing verify sigstore`` on our bundle. docs/sigstore-keyless.md says how to
check those against a real instance.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sigstore import dsse as sigstore_dsse

from keys.backends.base import BackendUnavailable, KeyNotUsable
from keys.backends.sigstore_keyless import (
    GITHUB_ACTIONS_ISSUER,
    IdentityNotAllowed,
    IdentityTokenError,
    SigstoreKeylessSigner,
    TrustConfigError,
    certificate_identities,
    certificate_issuer,
    load_trust_config,
    trust_config_urls,
)
from signing_service.bundle import PAYLOAD_TYPE, build_statement, pae, statement_payload
from signing_service.manifest import Resource

SIGSTORE_ISSUER = "https://oauth2.sigstore.dev/auth"
COMPANY_ISSUER = "https://sso.company.example"

# --- tokens --------------------------------------------------------------------------


def mint(claims: dict[str, Any], *, lifetime: int = 300, **overrides: Any) -> str:
    """An OIDC-shaped JWT signed with a throw-away HMAC key (sigstore does not check it)."""
    now = int(time.time())
    body: dict[str, Any] = {"aud": "sigstore", "iat": now, "exp": now + lifetime, **claims}
    body.update(overrides)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, "x" * 32, "HS256")


def email_token(**overrides: Any) -> str:
    claims = {
        "iss": SIGSTORE_ISSUER,
        "sub": "CgQxMjM0EgZnaXRodWI",
        "email": "alice@company.com",
        "email_verified": True,
        "federated_claims": {"connector_id": "https://github.com/login/oauth"},
    }
    return mint(claims, **overrides)


def github_token(**overrides: Any) -> str:
    claims = {
        "iss": GITHUB_ACTIONS_ISSUER,
        "sub": "repo:acme/models:ref:refs/heads/main",
        "repository": "acme/models",
        "job_workflow_ref": "acme/models/.github/workflows/release.yml@refs/heads/main",
    }
    return mint(claims, **overrides)


# --- a private instance on loopback ----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test fulcio root")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(key, hashes.SHA384())
    )
    return key, cert


CA_KEY, CA_CERT = _ca()


def _tlog(url: str, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    spki = _spki(key)
    return {
        "baseUrl": url,
        "hashAlgorithm": "SHA2_256",
        "publicKey": {
            "rawBytes": _b64(spki),
            "keyDetails": "PKIX_ECDSA_P256_SHA_256",
            "validFor": {"start": "2024-01-01T00:00:00Z"},
        },
        "logId": {"keyId": _b64(hashlib.sha256(spki).digest())},
    }


def trust_config_json(fulcio: str, rekor: str, oidc: str | None = COMPANY_ISSUER) -> str:
    """A ClientTrustConfig as model_signing's --trust_config expects, for loopback URLs."""

    def service(url: str) -> dict[str, Any]:
        start = {"start": "2024-01-01T00:00:00Z"}
        return {"url": url, "majorApiVersion": 1, "validFor": start, "operator": "test"}

    signing_config: dict[str, Any] = {
        "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
        "caUrls": [service(fulcio)],
        "oidcUrls": [service(oidc)] if oidc else [],
        "rekorTlogUrls": [service(rekor)],
        "tsaUrls": [],
        "rekorTlogConfig": {"selector": "ANY"},
        "tsaConfig": {"selector": "ANY"},
    }
    trusted_root = {
        "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "tlogs": [_tlog(rekor, ec.generate_private_key(ec.SECP256R1()))],
        "certificateAuthorities": [
            {
                "subject": {"organization": "test", "commonName": "test fulcio"},
                "uri": fulcio,
                "certChain": {
                    "certificates": [
                        {"rawBytes": _b64(CA_CERT.public_bytes(serialization.Encoding.DER))}
                    ]
                },
                "validFor": {"start": "2024-01-01T00:00:00Z"},
            }
        ],
        "ctlogs": [_tlog("http://127.0.0.1:1/ct", ec.generate_private_key(ec.SECP256R1()))],
        "timestampAuthorities": [],
    }
    return json.dumps(
        {
            "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
            "trustedRoot": trusted_root,
            "signingConfig": signing_config,
        }
    )


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not
    listening, so the kernel answers a connect with RST at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def black_hole_port() -> Iterator[int]:
    """A loopback port that accepts connections (kernel backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def write_config(tmp_path: Path, fulcio: str, rekor: str) -> str:
    path = tmp_path / "trust_config.json"
    path.write_text(trust_config_json(fulcio, rekor), encoding="utf-8")
    return str(path)


def statement() -> dict[str, Any]:
    return build_statement("demo", [Resource("model.bin", "ab" * 32)])


# --- identity ------------------------------------------------------------------------


def test_email_identity_uses_email_and_federated_issuer() -> None:
    signer = SigstoreKeylessSigner()
    assert signer.identity_of(email_token()) == (
        "alice@company.com",
        "https://github.com/login/oauth",
    )


def test_github_actions_identity_is_the_workflow_uri_fulcio_puts_in_the_san() -> None:
    identity, issuer = SigstoreKeylessSigner().identity_of(github_token())
    assert identity == (
        "https://github.com/acme/models/.github/workflows/release.yml@refs/heads/main"
    )
    assert issuer == GITHUB_ACTIONS_ISSUER


def test_github_actions_token_without_job_workflow_ref_is_refused() -> None:
    with pytest.raises(IdentityTokenError, match="job_workflow_ref"):
        SigstoreKeylessSigner().identity_of(github_token(job_workflow_ref=None))


def test_unknown_issuer_falls_back_to_sub_like_sigstore() -> None:
    token = mint({"iss": COMPANY_ISSUER, "sub": "svc-ml-ci"})
    assert SigstoreKeylessSigner().identity_of(token) == ("svc-ml-ci", COMPANY_ISSUER)


def test_signature_of_the_token_is_not_checked_here() -> None:
    # Any HMAC key works: identity_of reads claims, it does not authenticate.
    forged = jwt.encode(jwt.decode(email_token(), options={"verify_signature": False}), "k" * 32)
    assert SigstoreKeylessSigner().identity_of(forged)[0] == "alice@company.com"


# Tokens are made when the test runs, not at collection: a long suite would expire them first.
@pytest.mark.parametrize(
    ("make_token", "problem"),
    [
        (lambda: email_token(lifetime=-60), "expired"),
        (
            lambda: email_token(iat=int(time.time()) + 600, exp=int(time.time()) + 900),
            "not valid yet",
        ),
        (lambda: email_token(aud="someone-else"), "wrong audience"),
        (lambda: email_token(iss=None), "missing the 'iss' claim"),
        (lambda: "not-a-jwt", "malformed"),
        (lambda: email_token(email_verified=False), "not verified"),
    ],
    ids=["expired", "not-yet-valid", "audience", "no-iss", "malformed", "unverified"],
)
def test_token_problems_are_named_and_token_text_is_not_echoed(
    make_token: Callable[[], str], problem: str
) -> None:
    token = make_token()
    with pytest.raises(IdentityTokenError, match=problem) as info:
        SigstoreKeylessSigner().identity_of(token)
    assert isinstance(info.value, KeyNotUsable)
    assert token not in str(info.value)


def test_custom_audience_for_a_private_fulcio() -> None:
    signer = SigstoreKeylessSigner(client_id="company-fulcio")
    assert signer.identity_of(email_token(aud="company-fulcio"))[0] == "alice@company.com"
    with pytest.raises(IdentityTokenError, match="wrong audience"):
        signer.identity_of(email_token())


# --- trust config --------------------------------------------------------------------


def test_trust_config_file_builds_a_signing_context_offline(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    signer = SigstoreKeylessSigner(path)
    context = signer._signing_context()
    assert context._fulcio.url == "http://127.0.0.1:1"
    # RekorClient appends its API prefix.
    assert context._rekor.url == "http://127.0.0.1:2/api/v1"  # type: ignore[attr-defined]
    assert context._trusted_root.get_fulcio_certs()[0].subject == CA_CERT.subject
    urls = trust_config_urls(load_trust_config(path))
    assert urls["oidc"] == COMPANY_ISSUER


def test_health_reports_loaded_config_and_urls_without_network(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    health = SigstoreKeylessSigner(path).health()
    assert health.ok
    assert path in health.detail
    assert "Fulcio http://127.0.0.1:1" in health.detail
    assert "Rekor http://127.0.0.1:2/api/v1" in health.detail
    assert "not contacted" in health.detail


def test_health_for_public_good_says_nothing_is_loaded_yet() -> None:
    for staging, url in ((False, "tuf-repo-cdn.sigstore.dev"), (True, "tuf-repo-cdn.sigstage.dev")):
        health = SigstoreKeylessSigner(staging=staging).health()
        assert "not loaded yet" in health.detail and url in health.detail


def _mutate(tmp_path: Path, change: Any) -> str:
    data = json.loads(trust_config_json("http://127.0.0.1:1", "http://127.0.0.1:2"))
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d["signingConfig"].update(caUrls=[]), "No valid Fulcio CA"),
        (lambda d: d["signingConfig"].update(rekorTlogUrls=[]), "No valid Rekor"),
        (lambda d: d["signingConfig"].update(mediaType="x"), "signingConfig.mediaType: Input"),
        (
            # The schema knows signing config v0.1, but sigstore 4.5.1 signs only with v0.2.
            lambda d: d["signingConfig"].update(
                mediaType="application/vnd.dev.sigstore.signingconfig.v0.1+json"
            ),
            "unsupported signing config format",
        ),
        (lambda d: d["trustedRoot"].update(mediaType="x"), "trustedRoot.mediaType"),
        (lambda d: d.update(mediaType="x"), "mediaType"),
        (
            lambda d: d["signingConfig"]["caUrls"][0].update(
                validFor={"start": "2020-01-01T00:00:00Z", "end": "2021-01-01T00:00:00Z"}
            ),
            "No valid Fulcio CA",
        ),
    ],
)
def test_what_sigstore_requires_in_a_trust_config(
    tmp_path: Path, change: Any, problem: str
) -> None:
    with pytest.raises(TrustConfigError, match=problem):
        SigstoreKeylessSigner(_mutate(tmp_path, change))


def test_unreadable_or_non_json_trust_config(tmp_path: Path) -> None:
    with pytest.raises(TrustConfigError, match="cannot read"):
        SigstoreKeylessSigner(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TrustConfigError, match="invalid"):
        SigstoreKeylessSigner(str(tmp_path / "junk.json"))
    with pytest.raises(ValueError):
        SigstoreKeylessSigner(str(tmp_path / "junk.json"), staging=True)


# --- signing failures ----------------------------------------------------------------


def test_closed_fulcio_port_fails_fast_naming_fulcio(tmp_path: Path, closed_port: int) -> None:
    fulcio = f"http://127.0.0.1:{closed_port}"
    signer = SigstoreKeylessSigner(write_config(tmp_path, fulcio, fulcio))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"Fulcio at {fulcio} unreachable") as info:
        signer.sign_statement(statement(), email_token())
    assert time.monotonic() - started < 5  # no retry loop
    assert "refused" in str(info.value).lower()


def test_black_hole_fulcio_times_out_within_the_bound(tmp_path: Path, black_hole_port: int) -> None:
    # sigstore 4.5.1 sets no timeout on Fulcio/Rekor calls; ours must bound it.
    fulcio = f"http://127.0.0.1:{black_hole_port}"
    signer = SigstoreKeylessSigner(
        write_config(tmp_path, fulcio, fulcio), connect_timeout=1, read_timeout=1
    )
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"Fulcio at {fulcio} timed out"):
        signer.sign_statement(statement(), email_token())
    assert time.monotonic() - started < 10


def test_token_is_refused_before_any_network_call(tmp_path: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    signer = SigstoreKeylessSigner(write_config(tmp_path, url, url))
    with pytest.raises(IdentityTokenError, match="expired"):
        signer.sign_statement(statement(), email_token(lifetime=-60))
    with pytest.raises(IdentityNotAllowed, match=r"'alice@company\.com'"):
        signer.sign_statement(statement(), email_token(), allowed_identities=["*@other.org"])


def test_public_good_without_network_is_backend_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stand-in for "no route to the TUF CDN": we must not try the real internet here.
    def offline(*_a: Any, **_k: Any) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr("sigstore.models.ClientTrustConfig.from_tuf", offline)
    with pytest.raises(BackendUnavailable, match="TUF repository at https://tuf-repo-cdn"):
        SigstoreKeylessSigner().sign_statement(statement(), email_token())


# --- Fulcio stubbed: Rekor and bundle assembly ----------------------------------------

_ISSUER_EXT = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")


def leaf_for(
    key: ec.EllipticCurvePublicKey, san: x509.GeneralName, issuer: str
) -> x509.Certificate:
    """A Fulcio-shaped leaf: SAN identity, issuer extension (DER UTF8String)."""
    now = dt.datetime.now(dt.UTC)
    issuer_der = b"\x0c" + bytes([len(issuer)]) + issuer.encode()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(CA_CERT.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(minutes=10))
        .add_extension(x509.SubjectAlternativeName([san]), critical=True)
        .add_extension(x509.UnrecognizedExtension(_ISSUER_EXT, issuer_der), critical=False)
        .sign(CA_KEY, hashes.SHA384())
    )


@pytest.fixture
def stub_fulcio(monkeypatch: pytest.MonkeyPatch) -> dict[str, x509.GeneralName]:
    """Replace the Fulcio round trip (CSR -> cert + SCT check) with a local CA."""
    wanted: dict[str, x509.GeneralName] = {"san": x509.RFC822Name("alice@company.com")}

    def signing_cert(self: Any) -> x509.Certificate:
        return leaf_for(
            self._private_key.public_key(), wanted["san"], "https://github.com/login/oauth"
        )

    monkeypatch.setattr("sigstore.sign.Signer._signing_cert", signing_cert)
    return wanted


def test_closed_rekor_port_names_rekor(tmp_path: Path, closed_port: int, stub_fulcio: Any) -> None:
    rekor = f"http://127.0.0.1:{closed_port}"
    signer = SigstoreKeylessSigner(write_config(tmp_path, "http://127.0.0.1:1", rekor))
    with pytest.raises(BackendUnavailable, match=f"Rekor at {rekor}/api/v1 unreachable"):
        signer.sign_statement(statement(), email_token())


def test_black_hole_rekor_times_out_within_the_bound(
    tmp_path: Path, black_hole_port: int, stub_fulcio: Any
) -> None:
    rekor = f"http://127.0.0.1:{black_hole_port}"
    signer = SigstoreKeylessSigner(
        write_config(tmp_path, "http://127.0.0.1:1", rekor), connect_timeout=1, read_timeout=1
    )
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"Rekor at {rekor}/api/v1 timed out"):
        signer.sign_statement(statement(), email_token())
    assert time.monotonic() - started < 10


def test_sigstore_dsse_payload_type_is_ours() -> None:
    assert sigstore_dsse.Envelope._TYPE == PAYLOAD_TYPE


class _FakeRekorV1(BaseHTTPRequestHandler):
    """Answers POST /api/v1/log/entries with the proposed entry and a made-up proof."""

    def do_POST(self) -> None:
        proposed = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/api/v1/log/entries"
        entry = {
            "body": _b64(proposed),
            "integratedTime": int(time.time()),
            "logID": "00" * 32,
            "logIndex": 7,
            "verification": {
                "inclusionProof": {
                    "logIndex": 7,
                    "rootHash": "11" * 32,
                    "treeSize": 8,
                    "hashes": ["22" * 32],
                    "checkpoint": "fake - 8\nEREREQ==\n\n— fake sig\n",
                },
                "signedEntryTimestamp": _b64(b"not a real SET"),
            },
        }
        body = json.dumps({"ab" * 32: entry}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def fake_rekor() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRekorV1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bundle_assembly_with_stubbed_fulcio_and_fake_rekor(
    tmp_path: Path, fake_rekor: str, stub_fulcio: Any
) -> None:
    signer = SigstoreKeylessSigner(write_config(tmp_path, "http://127.0.0.1:1", fake_rekor))
    stmt = statement()
    bundle = signer.sign_statement(stmt, email_token(), allowed_identities=["*@company.com"])

    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    envelope = bundle["dsseEnvelope"]
    payload = base64.b64decode(envelope["payload"])
    assert payload == statement_payload(stmt)  # the approved digest is what is signed
    assert envelope["payloadType"] == PAYLOAD_TYPE
    material = bundle["verificationMaterial"]
    cert = x509.load_der_x509_certificate(base64.b64decode(material["certificate"]["rawBytes"]))
    assert certificate_identities(cert) == {"alice@company.com"}
    assert certificate_issuer(cert) == "https://github.com/login/oauth"
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(
        base64.b64decode(envelope["signatures"][0]["sig"]), pae(payload), ec.ECDSA(hashes.SHA256())
    )
    assert len(material["tlogEntries"]) == 1
    assert material["tlogEntries"][0]["kindVersion"] == {"kind": "dsse", "version": "0.0.1"}


def test_certificate_for_another_identity_is_refused(
    tmp_path: Path, fake_rekor: str, stub_fulcio: dict[str, x509.GeneralName]
) -> None:
    # A Fulcio that derives the identity differently than we predicted: the policy
    # matched the wrong name, so the bundle must not be handed out.
    stub_fulcio["san"] = x509.UniformResourceIdentifier("https://company.example/u/alice")
    signer = SigstoreKeylessSigner(write_config(tmp_path, "http://127.0.0.1:1", fake_rekor))
    with pytest.raises(KeyNotUsable, match="refusing the bundle"):
        signer.sign_statement(statement(), email_token())
