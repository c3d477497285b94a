"""deploy/kubernetes/admission_adapter.py against the running service: AdmissionReviews in,
the service's verdict and reasons out, failing closed on anything it cannot judge."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import json
import ssl
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.utils import timezone

from approvals.services import decide
from signing_service import bundle
from signing_service.client.api import ServiceClient
from tests.fixtures_service import authed, request_body, write_model

pytestmark = [pytest.mark.softhsm, pytest.mark.django_db(transaction=True)]

KUBE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
SAMPLE_PREFIX = "https://models.example.com/bundles/"
POLICY = """
certificate_policy:
  version: "admission-test"
  signing_authorities:
    production: {type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
                 authorized_signers: [ml-platform-ci@company.com], requires_approval: true, approval_count: 1}
    staging: {type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
              authorized_signers: [ml-platform-ci@company.com], requires_approval: false}
    development: {type: key-based, key_storage: HSM, key_algorithm: ECDSA-P256,
                  authorized_signers: ["*@company.com"], requires_approval: false}
  verification_policy:
    production_deployment: {require_signature: true, accepted_authorities: [production],
                            require_provenance: false, max_signature_age_days: 90}
    staging_deployment: {require_signature: true, accepted_authorities: [production, staging],
                         require_provenance: false}
"""


def load_adapter() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "admission_adapter", KUBE / "admission_adapter.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


adapter = load_adapter()


def serve(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A plain HTTP file server: where pipelines publish their bundles."""
    root = tmp_path / "store"
    (root / "bundles").mkdir(parents=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for url in serve(server):
        yield root / "bundles", f"{url}/bundles/"


@pytest.fixture
def world(
    settings: Any,
    tmp_path: Path,
    live_server: Any,
    api: Any,
    issue_token: Any,
    active_keys: Any,
    make_user: Any,
    store: tuple[Path, str],
) -> dict[str, Any]:
    """A production model approved by alice, a staging model, their bundles in the store."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    settings.SIGNING_POLICY_FILE = str(tmp_path / "policy.yaml")
    directory, prefix = store
    ci = authed(api, issue_token(authorities=("staging", "production")))
    out: dict[str, Any] = {"service": live_server.url, "prefix": prefix, "dir": directory}
    for authority in ("production", "staging"):
        model = write_model(tmp_path / authority, {"weights.bin": authority.encode() * 500})
        rid = ci.post(
            "/api/v1/signing-requests/", request_body(model, environment=authority), format="json"
        ).json()["id"]
        if authority == "production":
            decide(rid, make_user("alice"), "approve", otp_verified_at=timezone.now())
        data = ci.get(f"/api/v1/signing-requests/{rid}/bundle").content
        (directory / f"{authority}.sig").write_bytes(data)
        out[authority] = bundle.unsafe_read_statement(data).root_digest
    return out


def config(world: dict[str, Any], **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "service": ServiceClient(world["service"], timeout=10, retries=0),
        "allowed_deployments": frozenset({"production_deployment", "staging_deployment"}),
        "bundle_url_prefixes": (world["prefix"],),
    }
    return adapter.Config(**{**values, **overrides})


@pytest.fixture
def webhook(world: dict[str, Any]) -> Iterator[str]:
    """The adapter's HTTP server, in this process, judging with the live service."""
    yield from serve(adapter.make_server(config(world), "127.0.0.1", 0))


def sample(world: dict[str, Any], which: str | None = "production", **annotations: str) -> Any:
    """deploy/kubernetes/sample-admission-review.json, its bundle URL in the test store."""
    review = json.loads((KUBE / "sample-admission-review.json").read_text())
    meta = review["request"]["object"]["spec"]["template"]["metadata"]
    notes = meta["annotations"]
    assert notes["models.example.com/bundle-url"].startswith(SAMPLE_PREFIX)
    if which is None:
        del notes["models.example.com/bundle-url"]
    else:
        notes["models.example.com/bundle-url"] = f"{world['prefix']}{which}.sig"
    notes.update({f"models.example.com/{k}": v for k, v in annotations.items()})
    return review


def pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "pod-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "ml-serving",
            "name": "p",
            "operation": "CREATE",
            "object": {"kind": "Pod", "metadata": {"name": "p", "annotations": annotations}},
        },
    }


def post(url: str, body: Any, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"{url}/validate", data=data, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def answer(url: str, review: Any) -> dict[str, Any]:
    status, body = post(url, review)
    assert status == 200, body
    assert (body["apiVersion"], body["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert body["response"]["uid"] == review["request"]["uid"]
    return body["response"]


# --- verdicts --------------------------------------------------------------------------


def test_the_sample_deployment_with_an_approved_production_model_is_allowed(
    world: dict[str, Any], webhook: str
) -> None:
    response = answer(webhook, sample(world))
    assert response == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_a_staging_model_is_denied_production_with_the_services_reasons(
    world: dict[str, Any], webhook: str
) -> None:
    response = answer(webhook, sample(world, "staging"))
    assert response["allowed"] is False and response["status"]["code"] == 403
    message = response["status"]["message"]
    assert message.startswith("model rejected for production_deployment: authority: ")
    # Exactly the service's own failed checks, as the service words them.
    staging = json.loads((world["dir"] / "staging.sig").read_bytes())
    verdict = ServiceClient(world["service"]).verify(
        {"deployment": "production_deployment", "bundle": staging}
    )
    failed = [f"{c['name']}: {c['detail']}" for c in verdict["checks"] if not c["ok"]]
    assert failed and message.endswith("; ".join(failed))
    # The same bundle is fine where staging models may run.
    assert answer(webhook, sample(world, "staging", deployment="staging_deployment"))["allowed"]


def test_an_unsigned_model_and_a_forged_bundle_are_denied(
    world: dict[str, Any], webhook: str
) -> None:
    unsigned = answer(webhook, sample(world, None))
    assert unsigned["allowed"] is False
    assert (
        "signature present: production_deployment requires a signature"
        in (unsigned["status"]["message"])
    )
    # A bundle signed by a key the service does not know, for the production model's files.
    real = bundle.unsafe_read_statement((world["dir"] / "production.sig").read_bytes())
    other = ec.generate_private_key(ec.SECP256R1())
    der = other.sign(bundle.pae(real.payload), ec.ECDSA(hashes.SHA256()))
    forged = bundle.build_bundle(real.payload, der, hint=bundle.key_hint(other.public_key()))
    (world["dir"] / "forged.sig").write_bytes(bundle.bundle_bytes(forged))
    response = answer(webhook, sample(world, "forged"))
    assert response["allowed"] is False
    assert "bundle signature: the bundle is signed by" in response["status"]["message"]


def test_the_model_digest_annotation_binds_the_bundle_to_one_model(
    world: dict[str, Any], webhook: str
) -> None:
    digest = world["production"]
    assert answer(webhook, sample(world, **{"model-digest": f"sha256:{digest}"}))["allowed"]
    wrong = answer(webhook, sample(world, **{"model-digest": world["staging"]}))
    assert wrong["allowed"] is False
    assert wrong["status"]["message"] == (
        f"the bundle signs model {digest}, not the annotated {world['staging']}"
    )


def test_warn_mode_allows_with_the_failed_checks_as_warnings(world: dict[str, Any]) -> None:
    for url in serve(adapter.make_server(config(world, mode="warn"), "127.0.0.1", 0)):
        response = answer(url, sample(world, "staging"))
    assert response["allowed"] is True
    assert any(w.startswith("model check failed: authority: ") for w in response["warnings"])


def test_workloads_without_a_model(world: dict[str, Any], webhook: str) -> None:
    plain = pod({"team": "search"})
    assert answer(webhook, plain) == {"uid": "pod-1", "allowed": True}
    for url in serve(adapter.make_server(config(world, require_model=True), "127.0.0.1", 0)):
        strict = answer(url, plain)
    assert strict["allowed"] is False
    assert "no models.example.com/ annotations" in strict["status"]["message"]


def test_a_pod_is_judged_like_its_deployment(world: dict[str, Any], webhook: str) -> None:
    notes = {"models.example.com/deployment": "production_deployment"}
    good = pod({**notes, "models.example.com/bundle-url": f"{world['prefix']}production.sig"})
    bad = pod({**notes, "models.example.com/bundle-url": f"{world['prefix']}staging.sig"})
    assert answer(webhook, good)["allowed"] is True
    assert answer(webhook, bad)["allowed"] is False


# --- what the adapter refuses before asking --------------------------------------------


BAD_ANNOTATIONS = [
    ({"deployment": "development_deployment"},
     "deployment 'development_deployment' is not judged here (allowed: production_deployment, staging_deployment)"),
    ({"bundle_url": "http://169.254.169.254/latest/meta-data/"}, "is not under an allowed prefix"),
    ({"bundle_url": "PREFIX../../etc/passwd"}, "is not under an allowed prefix"),
    ({"bundle_url": "PREFIX%2e%2e/secret"}, "is not under an allowed prefix"),
    ({"bundle_url": "PREFIXmissing.sig"}, "cannot fetch the bundle PREFIXmissing.sig: HTTP 404"),
    ({"bundle_url": "PREFIXnot-a-bundle.json"}, "PREFIXnot-a-bundle.json is not a model bundle: bundle mediaType must be"),
    ({"model-digest": "abc", "bundle_url": None}, "a model-digest annotation needs a bundle-url annotation"),
    ({"bundle-uri": "typo"}, "unknown annotation models.example.com/bundle-uri"),
    ({"object_deployment": "staging_deployment"},
     "models.example.com/deployment differs between the object and its pod template"),
]  # fmt: skip


def test_bad_annotations_are_denied_with_the_reason(world: dict[str, Any], webhook: str) -> None:
    (world["dir"] / "not-a-bundle.json").write_text('{"hello": "world"}')
    for change, expected in BAD_ANNOTATIONS:  # one world for all: signing it is the slow part
        review = sample(world)
        obj = review["request"]["object"]
        notes = obj["spec"]["template"]["metadata"]["annotations"]
        for key, value in change.items():
            if key == "bundle_url" and value is None:
                del notes["models.example.com/bundle-url"]
            elif key == "bundle_url":
                notes["models.example.com/bundle-url"] = value.replace("PREFIX", world["prefix"])
            elif key == "object_deployment":
                obj["metadata"]["annotations"] = {"models.example.com/deployment": value}
            else:
                notes[f"models.example.com/{key}"] = value
        response = answer(webhook, review)
        assert response["allowed"] is False, change
        message = response["status"]["message"]
        assert expected.replace("PREFIX", world["prefix"]) in message, (change, message)


def test_an_unreachable_service_fails_closed(world: dict[str, Any]) -> None:
    down = ServiceClient("http://127.0.0.1:9", timeout=2, retries=0)  # discard port: refused
    response = adapter.review(sample(world), config(world, service=down))["response"]
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(
        "the signing service could not judge the model: cannot reach http://127.0.0.1:9/api/v1/verify/"
    )


# --- the HTTP side ---------------------------------------------------------------------


def test_malformed_requests_get_400_and_health_answers(world: dict[str, Any], webhook: str) -> None:
    assert post(webhook, b"{not json")[0] == 400
    status, body = post(webhook, {"kind": "AdmissionReview", "request": {"object": {}}})
    assert (status, body["error"]) == (
        400,
        "bad AdmissionReview: the AdmissionReview request has no uid",
    )
    with urllib.request.urlopen(f"{webhook}/healthz", timeout=10) as resp:  # noqa: S310
        assert json.loads(resp.read()) == {"status": "ok"}


def test_it_serves_tls(world: dict[str, Any], tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelsign-admission")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = adapter.tls_context(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    client = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    for url in serve(adapter.make_server(config(world), "127.0.0.1", 0, tls)):
        status, body = post(
            url.replace("http://127.0.0.1", "https://localhost"), sample(world), client
        )
    assert status == 200 and body["response"]["allowed"] is True


# --- the manifests ---------------------------------------------------------------------


def test_the_manifests_fit_the_adapter() -> None:
    webhook_config = yaml.safe_load((KUBE / "webhook.yaml").read_text())
    assert webhook_config["kind"] == "ValidatingWebhookConfiguration"
    (hook,) = webhook_config["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert {r["resources"][0] for r in hook["rules"]} == {"pods", "deployments"}
    manifests = {d["kind"]: d for d in yaml.safe_load_all((KUBE / "adapter.yaml").read_text())}
    service = hook["clientConfig"]["service"]
    assert service["path"] == "/validate"
    assert (service["namespace"], service["name"]) == (
        manifests["Service"]["metadata"]["namespace"],
        manifests["Service"]["metadata"]["name"],
    )
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = adapter.parse_args(container["args"])  # the example's arguments are accepted
    assert args.bundle_url_prefix == ["https://models.example.com/bundles/"]
    assert args.listen.endswith(":8443") and args.tls_cert and args.mode == "strict"
