"""`modelsign bom`: a CycloneDX 1.6 ML-BOM of a signed model, valid against the CycloneDX
schema, describing only files that match the signature."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from signing_service import bundle
from signing_service.client import hashing
from signing_service.client.cli import main
from signing_service.manifest import DEFAULT_IGNORE_PATHS

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "weights.bin": bytes(range(256)) * 300,
    "config.json": b'{"layers": 2}',
    "tokenizer/vocab.txt": "hello\nwörld\n".encode(),
    ".git/HEAD": b"ref: refs/heads/main\n",  # ignored by model_signing, so not in the BOM
}
SIGNED = {name: data for name, data in FILES.items() if not name.startswith(".git/")}
SLSA_BUILD_TYPE = "https://actions.github.io/buildtypes/workflow/v1"
BUILDER = "https://github.com/actions/runner/github-hosted"
SOURCE = "git+https://github.com/acme/models@refs/heads/main"
COMMIT = "7fd1a60b01f91b314f59955a4e4d4e80d8edf11d"


def write_model(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def sign_payload(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    return key.sign(bundle.pae(payload), ec.ECDSA(hashes.SHA256()))


def throwaway_sign(model: Path, out: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Sign the model as the service does, with a throwaway key; return the key's PEM file."""
    key = ec.generate_private_key(ec.SECP256R1())
    result = hashing.hash_model(model)
    statement = bundle.build_statement(
        result.model, result.resources, ignore_paths=result.ignore_paths, service_metadata=metadata
    )
    payload = bundle.statement_payload(statement)
    hint = bundle.key_hint(key.public_key())
    out.write_bytes(
        bundle.bundle_bytes(bundle.build_bundle(payload, sign_payload(key, payload), hint=hint))
    )
    pem = out.with_suffix(".pem")
    pem.write_text(bundle.public_key_pem(key.public_key()))
    return pem


def provenance_bundle(out: Path, subject_digest: str, **predicate: Any) -> Path:
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "model", "digest": {"sha256": subject_digest}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": predicate
        or {
            "buildDefinition": {
                "buildType": SLSA_BUILD_TYPE,
                "externalParameters": {
                    "workflow": {
                        "ref": "refs/heads/main",
                        "repository": "https://github.com/acme/models",
                        "path": ".github/workflows/train.yml",
                    }
                },
                "resolvedDependencies": [{"uri": SOURCE, "digest": {"gitCommit": COMMIT}}],
            },
            "runDetails": {
                "builder": {"id": BUILDER},
                "metadata": {"invocationId": "https://github.com/acme/models/actions/runs/42/1"},
            },
        },
    }
    key = ec.generate_private_key(ec.SECP256R1())
    payload = json.dumps(statement).encode()
    hint = bundle.key_hint(key.public_key())
    out.write_bytes(
        bundle.bundle_bytes(bundle.build_bundle(payload, sign_payload(key, payload), hint=hint))
    )
    return out


def bom_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["bom", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def validate(text: str) -> dict[str, Any]:
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert error is None, error
    return json.loads(text)


def model_component(doc: dict[str, Any]) -> dict[str, Any]:
    models = [c for c in doc["components"] if c["type"] == "machine-learning-model"]
    assert len(models) == 1
    return models[0]


def props(component: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in component.get("properties", []):
        out.setdefault(p["name"], []).append(p["value"])
    return out


def refs(component: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["type"]: r for r in component.get("externalReferences", [])}


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model, bundle outside it, public key PEM), signed with a throwaway key."""
    model = write_model(tmp_path / "resnet")
    sig = tmp_path / "resnet.sig"
    meta = {"authority": "staging", "model_version": "2.1", "requester": "ci@company.com"}
    pem = throwaway_sign(model, sig, meta)
    return model, sig, pem


# --- a model signed by the service -----------------------------------------------------


@pytest.mark.softhsm
@pytest.mark.django_db
def test_a_service_signed_model_gets_a_valid_bom_with_its_signature(
    tmp_path: Path,
    api: Any,
    issue_token: Any,
    active_keys: Any,
    make_user: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from django.utils import timezone

    from approvals.models import Approval
    from approvals.services import decide
    from signing_service.models import SigningRequest
    from tests.fixtures_service import CI_IDENTITY, authed, request_body

    model = write_model(tmp_path / "resnet")
    ci = authed(api, issue_token(authorities=("production",)))
    body = request_body(model, environment="production", version="3.0.0")
    rid = ci.post("/api/v1/signing-requests/", body, format="json").json()["id"]
    for name in ("alice", "bob"):
        decide(rid, make_user(name), "approve", otp_verified_at=timezone.now())
    sig = model / "model.sig"  # inside the model: left out of it, as model_signing does
    sig.write_bytes(ci.get(f"/api/v1/signing-requests/{rid}/bundle").content)
    pem = tmp_path / "production.pem"
    pem.write_text(active_keys["production"].public_key_pem)
    out = tmp_path / "resnet.cdx.json"

    argv = [str(model), "--signature", str(sig), "--public-key", str(pem), "-o", str(out)]
    rc, stdout, err = bom_of(*argv, capsys=capsys)
    assert rc == 0, err
    assert stdout == "" and f"wrote {out}: 3 files" in err
    doc = validate(out.read_text())
    assert (doc["bomFormat"], doc["specVersion"]) == ("CycloneDX", "1.6")

    req = SigningRequest.objects.get(pk=rid)
    root = hashing.hash_model(model, ignore_paths=["model.sig"]).root_digest
    ml = model_component(doc)
    assert (ml["name"], ml["version"]) == ("resnet", "3.0.0")
    assert ml["hashes"] == [{"alg": "SHA-256", "content": root}]
    files = {c["name"]: c["hashes"] for c in doc["components"] if c["type"] == "file"}
    assert files == {
        name: [{"alg": "SHA-256", "content": hashlib.sha256(data).hexdigest()}]
        for name, data in SIGNED.items()
    }
    deps = {d["ref"]: set(d.get("dependsOn", [])) for d in doc["dependencies"]}
    assert deps[ml["bom-ref"]] == {f"file:{name}" for name in SIGNED}

    p = props(ml)
    statement = bundle.verify_bundle(sig.read_bytes(), bundle.load_public_key(pem.read_bytes()))
    meta = statement.service_metadata
    assert p["modelsign:authority"] == ["production"]
    assert p["modelsign:key_hint"] == [active_keys["production"].hint]
    assert p["modelsign:signer_identity"] == [CI_IDENTITY]
    assert p["modelsign:request_id"] == [str(rid)]
    assert p["modelsign:statement_digest"] == [req.statement_digest]
    assert p["modelsign:signed_at"] == [meta["signed_at"]]
    assert p["modelsign:signature_check"] == [
        f"verified with public key sha256:{active_keys['production'].hint}"
    ]
    approvals = Approval.objects.filter(request_id=rid)
    assert sorted(json.loads(v)["approver"] for v in p["modelsign:approver"]) == sorted(
        a.approver_identity for a in approvals
    )
    assert len(p["modelsign:approver"]) == 2
    decided = {
        json.loads(v)["approver"]: json.loads(v)["decided_at"] for v in p["modelsign:approver"]
    }
    for a in approvals:
        assert datetime.fromisoformat(decided[a.approver_identity]) == a.decided_at
    signature_ref = refs(ml)["digital-signature"]
    assert signature_ref["url"] == "model.sig"
    assert signature_ref["hashes"][0]["content"] == hashlib.sha256(sig.read_bytes()).hexdigest()
    assert datetime.fromisoformat(doc["metadata"]["timestamp"]) == datetime.fromisoformat(
        meta["signed_at"]
    )

    # The same model, its signature checked with the service's trust document instead.
    from signing_service.trust import current_document

    trust = current_document()
    (tmp_path / "trust.json").write_text(trust.envelope)
    argv = [str(model), "--signature", str(sig), "--trust", str(tmp_path / "trust.json")]
    rc, stdout, err = bom_of(*argv, "--quiet", capsys=capsys)
    assert rc == 0, err
    checked = props(model_component(validate(stdout)))["modelsign:signature_check"]
    assert checked == [f"verified with trust document version {trust.version}"]


# --- contents, determinism -------------------------------------------------------------


def test_same_inputs_give_the_same_bom(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, pem = signed
    argv = [str(model), "--signature", str(sig), "--public-key", str(pem), "--quiet"]
    first = bom_of(*argv, capsys=capsys)
    second = bom_of(*argv, capsys=capsys)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]
    doc = validate(first[1])
    payload_digest = hashlib.sha256(
        bundle.verify_bundle(sig.read_bytes(), bundle.load_public_key(pem.read_bytes())).payload
    ).hexdigest()
    assert props(model_component(doc))["modelsign:signed_statement_sha256"] == [payload_digest]
    assert uuid.UUID(doc["serialNumber"].removeprefix("urn:uuid:")).version == 5
    # Another signature of the same files is another BOM.
    other = tmp_path / "other.sig"
    other_pem = throwaway_sign(model, other, {"authority": "staging", "model_version": "2.1"})
    rc, text, _ = bom_of(str(model), "--signature", str(other), "--public-key", str(other_pem),
                         "--quiet", capsys=capsys)  # fmt: skip
    assert rc == 0 and json.loads(text)["serialNumber"] != doc["serialNumber"]


def test_an_unchecked_signature_is_said_so(
    signed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, _ = signed
    rc, text, err = bom_of(str(model), "--signature", str(sig), "--quiet", capsys=capsys)
    assert rc == 0
    assert "signature is not checked" in err
    ml = model_component(validate(text))
    assert props(ml)["modelsign:signature_check"] == ["not checked"]
    assert "timestamp" not in json.loads(text)["metadata"]  # no signed_at: no time is made up


def test_a_wrong_public_key_is_refused(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, _ = signed
    other = throwaway_sign(model, tmp_path / "x.sig")
    rc, out, err = bom_of(str(model), "--signature", str(sig), "--public-key", str(other),
                          capsys=capsys)  # fmt: skip
    assert (rc, out) == (1, "")
    assert "verification failed: the bundle's key hint does not match" in err


def test_a_single_file_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"tensor" * 1000)
    pem = throwaway_sign(model, tmp_path / "model.sig")
    argv = [str(model), "--signature", str(tmp_path / "model.sig"), "--public-key", str(pem)]
    rc, text, err = bom_of(*argv, "--quiet", capsys=capsys)
    assert rc == 0, err
    doc = validate(text)
    files = [c for c in doc["components"] if c["type"] == "file"]
    assert [(f["name"], f["hashes"][0]["content"]) for f in files] == [
        ("model.safetensors", hashlib.sha256(b"tensor" * 1000).hexdigest())
    ]


def test_a_certificate_signed_bundle_names_its_signer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path / "m")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    issuer_v2 = b"\x0c\x1bhttps://issuer.company.com"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-fulcio")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(minutes=10))
        .add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name("ml-engineer-ann@company.com")]), True
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8"), issuer_v2),
            False,
        )
        .sign(key, hashes.SHA256())
    )
    result = hashing.hash_model(model)
    payload = bundle.statement_payload(
        bundle.build_statement(result.model, result.resources, ignore_paths=result.ignore_paths)
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    sig = tmp_path / "m.sig"
    sig.write_bytes(
        bundle.bundle_bytes(
            bundle.build_bundle(payload, sign_payload(key, payload), certificate_chain_der=[der])
        )
    )
    rc, text, err = bom_of(str(model), "--signature", str(sig), "--quiet", capsys=capsys)
    assert rc == 0, err
    p = props(model_component(validate(text)))
    assert p["modelsign:signer_identity"] == ["ml-engineer-ann@company.com"]
    assert p["modelsign:signer_issuer"] == ["https://issuer.company.com"]
    assert "modelsign:key_hint" not in p


def test_a_big_model_is_checked_against_the_schema_with_a_sample_of_its_files(
    signed: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from signing_service.client import bom

    model, sig, pem = signed
    monkeypatch.setattr(bom, "VALIDATE_FILES", 1)
    rc, text, err = bom_of(str(model), "--signature", str(sig), "--public-key", str(pem),
                           "--quiet", capsys=capsys)  # fmt: skip
    assert rc == 0, err
    doc = validate(text)  # the whole document, every file
    assert len([c for c in doc["components"] if c["type"] == "file"]) == len(SIGNED)


def test_a_bom_the_schema_refuses_is_never_written(tmp_path: Path) -> None:
    from signing_service.client import bom
    from signing_service.manifest import Resource

    statement = bundle.VerifiedStatement(
        statement={"predicate": {}}, payload=b"{}", model_name="m", root_digest="0" * 64,
        resources=[Resource("weights.bin", "not-hex")], ignore_paths=[], hint=None,
    )  # fmt: skip
    signature = bom.read_signature(b"{}", "m.sig", statement)
    with pytest.raises(bom.BomError, match=r"does not validate against CycloneDX 1\.6"):
        bom.render(bom.build_bom(signature))


# --- the model must match the signature ------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda m: (m / "weights.bin").write_bytes(b"evil"), "changed file: weights.bin"),
        (lambda m: (m / "extra.py").write_text("import os"), "extra file (not in the signature): extra.py"),
        (lambda m: (m / "config.json").unlink(), "missing file (in the signature): config.json"),
    ],
    ids=["changed", "extra", "missing"],
)  # fmt: skip
def test_a_tampered_model_is_refused(
    signed: tuple[Path, Path, Path],
    tmp_path: Path,
    damage: Any,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, sig, pem = signed
    damage(model)
    out = tmp_path / "bom.json"
    rc, stdout, err = bom_of(str(model), "--signature", str(sig), "--public-key", str(pem),
                             "-o", str(out), "--quiet", capsys=capsys)  # fmt: skip
    assert (rc, stdout) == (1, "")
    assert expected in err
    assert "does not match the signature (1 problem(s)); no BOM written" in err
    assert not out.exists()


def test_ignored_and_own_files_are_left_out(
    signed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, pem = signed
    (model / ".git" / "HEAD").write_text("changed, but ignored")
    (model / "notes.txt").write_text("not signed")
    out = model / "bom.json"  # written inside the model: not a model file
    argv = [str(model), "--signature", str(sig), "--public-key", str(pem), "-o", str(out),
            "--ignore-paths", str(model / "notes.txt"), "--quiet"]  # fmt: skip
    rc, _, err = bom_of(*argv, capsys=capsys)
    assert rc == 0, err
    rc, _, err = bom_of(*argv, capsys=capsys)  # the first BOM is not an extra file
    assert rc == 0, err
    assert bom_of(*argv[:-3], "--quiet", capsys=capsys)[0] == 1  # notes.txt is not signed
    doc = validate(out.read_text())
    assert {c["name"] for c in doc["components"] if c["type"] == "file"} == set(SIGNED)
    assert set(props(model_component(doc))["modelsign:ignore_path"]) == set(DEFAULT_IGNORE_PATHS)


def test_a_progress_line_for_the_hashing(
    signed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, pem = signed
    rc, _, err = bom_of(str(model), "--signature", str(sig), "--public-key", str(pem),
                        capsys=capsys)  # fmt: skip
    assert rc == 0
    assert "hashing 3 files: " in err  # the summary line of the progress bar


# --- provenance ------------------------------------------------------------------------


def test_provenance_is_included(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, pem = signed
    root = hashing.hash_model(model).root_digest
    prov = provenance_bundle(tmp_path / "provenance.sigstore.json", root)
    argv = [str(model), "--signature", str(sig), "--public-key", str(pem), "--quiet"]
    rc, text, err = bom_of(*argv, "--provenance", str(prov), capsys=capsys)
    assert rc == 0, err
    doc = validate(text)
    ml = model_component(doc)
    p = props(ml)
    assert p["modelsign:provenance:builder_id"] == [BUILDER]
    assert p["modelsign:provenance:build_type"] == [SLSA_BUILD_TYPE]
    assert p["modelsign:provenance:source_uri"] == [SOURCE]
    assert p["modelsign:provenance:source_commit"] == [COMMIT]
    assert p["modelsign:provenance:signature_check"] == ["not checked"]
    r = refs(ml)
    assert r["attestation"]["url"] == "provenance.sigstore.json"
    assert r["attestation"]["hashes"][0]["content"] == hashlib.sha256(prov.read_bytes()).hexdigest()
    assert (r["vcs"]["url"], r["vcs"]["comment"]) == (SOURCE, f"commit {COMMIT}")
    assert r["build-system"]["url"] == BUILDER
    without = bom_of(*argv, capsys=capsys)[1]
    assert json.loads(without)["serialNumber"] != doc["serialNumber"]


def test_provenance_without_a_pinned_commit_names_the_workflow_repository(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, _ = signed
    root = hashing.hash_model(model).root_digest
    predicate = {
        "buildDefinition": {
            "buildType": SLSA_BUILD_TYPE,
            "externalParameters": {"workflow": {"repository": "https://github.com/acme/models"}},
        },
        "runDetails": {"builder": {"id": BUILDER}},
    }
    prov = provenance_bundle(tmp_path / "p.json", root, **predicate)
    rc, text, err = bom_of(str(model), "--signature", str(sig), "--provenance", str(prov),
                           "--quiet", capsys=capsys)  # fmt: skip
    assert rc == 0, err
    p = props(model_component(validate(text)))
    assert p["modelsign:provenance:source_uri"] == ["https://github.com/acme/models"]
    assert "modelsign:provenance:source_commit" not in p


def test_provenance_for_other_content_is_refused(
    signed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, pem = signed
    prov = provenance_bundle(tmp_path / "p.json", "ab" * 32)
    rc, out, err = bom_of(str(model), "--signature", str(sig), "--public-key", str(pem),
                          "--provenance", str(prov), capsys=capsys)  # fmt: skip
    assert (rc, out) == (1, "")
    assert f"--provenance p.json is for other content: its subject digest ({'ab' * 32})" in err
    assert "hashing" not in err  # refused before the model is read


def provenance_digest(path: Path) -> str:
    """The provenance statement's digest, as a signed model statement names it."""
    payload = base64.b64decode(json.loads(path.read_bytes())["dsseEnvelope"]["payload"])
    return hashlib.sha256(bundle.statement_payload(json.loads(payload))).hexdigest()


@pytest.fixture
def with_provenance(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A model whose signed statement names its provenance, as the service signs it:
    (model, bundle, public key, provenance bundle)."""
    model = write_model(tmp_path / "resnet")
    root = hashing.hash_model(model).root_digest
    prov = provenance_bundle(tmp_path / "provenance.json", root)
    summary = {
        "subject_digest": root,
        "builder_id": BUILDER,
        "build_type": SLSA_BUILD_TYPE,
        "statement_digest": provenance_digest(prov),
    }
    sig = tmp_path / "resnet.sig"
    pem = throwaway_sign(model, sig, {"authority": "production", "provenance": summary})
    return model, sig, pem, prov


def test_provenance_named_by_the_signed_statement(
    with_provenance: tuple[Path, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, sig, pem, prov = with_provenance
    argv = [str(model), "--signature", str(sig), "--public-key", str(pem), "--quiet"]
    rc, text, err = bom_of(*argv, capsys=capsys)
    assert rc == 0, err
    p = props(model_component(validate(text)))
    assert p["modelsign:provenance:builder_id"] == [BUILDER]
    assert p["modelsign:provenance:build_type"] == [SLSA_BUILD_TYPE]
    assert p["modelsign:provenance:statement_digest"] == [provenance_digest(prov)]
    assert "modelsign:provenance:signature_check" not in p  # no provenance bundle was given
    rc, text, err = bom_of(*argv, "--provenance", str(prov), capsys=capsys)
    assert rc == 0, err
    p = props(model_component(validate(text)))
    assert p["modelsign:provenance:signature_check"] == [
        "named by the model's signed statement (its statement digest)"
    ]
    assert p["modelsign:provenance:source_commit"] == [COMMIT]


def test_provenance_other_than_the_signed_one_is_refused(
    with_provenance: tuple[Path, Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, sig, _, prov = with_provenance
    root = hashing.hash_model(model).root_digest
    other = provenance_bundle(tmp_path / "other.json", root, runDetails={"builder": {"id": "x"}})
    rc, out, err = bom_of(str(model), "--signature", str(sig), "--provenance", str(other),
                          "--quiet", capsys=capsys)  # fmt: skip
    assert (rc, out) == (1, "")
    assert (
        f"--provenance other.json is not the provenance the signature names: its statement "
        f"digest is {provenance_digest(other)}, the signed one {provenance_digest(prov)}"
    ) in err


def test_a_signed_provenance_summary_for_other_content_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path / "m")
    sig = tmp_path / "m.sig"
    summary = {"subject_digest": "cd" * 32, "builder_id": BUILDER, "statement_digest": "ef" * 32}
    throwaway_sign(model, sig, {"provenance": summary})
    rc, _, err = bom_of(str(model), "--signature", str(sig), "--quiet", capsys=capsys)
    assert rc == 1
    assert (
        f"the signed statement's provenance is for other content: subject digest {'cd' * 32}" in err
    )


# --- bad input -------------------------------------------------------------------------


def _statement_bundle(
    tmp_path: Path, statement: Any, media: str = bundle.BUNDLE_MEDIA_TYPE
) -> Path:
    payload = base64.b64encode(json.dumps(statement).encode()).decode()
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "mediaType": media, "verificationMaterial": {},
        "dsseEnvelope": {"payload": payload, "payloadType": "application/vnd.in-toto+json",
                         "signatures": [{"sig": "", "keyid": ""}]},
    }))  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-model", "cannot read model"),
        ("no-signature", "cannot read --signature"),
        ("signature-not-json", "bundle is not JSON"),
        ("signature-not-a-bundle", "bundle mediaType must be"),
        ("signature-not-a-model-statement", "predicateType must be 'https://model_signing/signature/v1.0'"),
        ("no-provenance", "cannot read --provenance"),
        ("provenance-not-json", "--provenance p.json is not JSON"),
        ("provenance-not-sigstore", "--provenance p.json is not a Sigstore bundle"),
        ("provenance-not-slsa", "predicateType is 'https://example.com/other', expected 'https://slsa.dev/provenance/v1'"),
        ("provenance-no-subject", "its statement has no subject with a sha256 digest"),
        ("out-dir-missing", "directory"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_error(
    signed: tuple[Path, Path, Path],
    tmp_path: Path,
    case: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, sig, _ = signed
    argv = [str(model), "--signature", str(sig)]
    slsa = {
        "_type": "https://in-toto.io/Statement/v1",
        "predicateType": "https://slsa.dev/provenance/v1",
    }
    if case == "no-model":
        argv[0] = str(tmp_path / "nothing")
    elif case == "no-signature":
        argv[2] = str(tmp_path / "nothing.sig")
    elif case == "signature-not-json":
        sig.write_text("{nope")
    elif case == "signature-not-a-bundle":
        sig.write_text('{"a": 1}')
    elif case == "signature-not-a-model-statement":
        argv[2] = str(_statement_bundle(tmp_path, {**slsa, "subject": []}))
    elif case == "no-provenance":
        argv += ["--provenance", str(tmp_path / "p.json")]
    elif case == "provenance-not-json":
        (tmp_path / "p.json").write_text("[")
        argv += ["--provenance", str(tmp_path / "p.json")]
    elif case == "provenance-not-sigstore":
        argv += ["--provenance", str(_statement_bundle(tmp_path, slsa, media="text/plain"))]
    elif case == "provenance-not-slsa":
        other = {**slsa, "predicateType": "https://example.com/other"}
        argv += ["--provenance", str(_statement_bundle(tmp_path, other))]
    elif case == "provenance-no-subject":
        argv += ["--provenance", str(_statement_bundle(tmp_path, {**slsa, "subject": [{}]}))]
    elif case == "out-dir-missing":
        argv += ["-o", str(tmp_path / "missing" / "bom.json")]
    rc, out, err = bom_of(*argv, "--quiet", capsys=capsys)
    assert (rc, out) == (1, "")
    assert err.count("modelsign: error: ") == 1 and expected in err, err
    assert "Traceback" not in err


def test_the_client_needs_no_django(signed: tuple[Path, Path, Path]) -> None:
    model, sig, pem = signed
    code = (
        "import sys; sys.modules['django'] = None; sys.modules['rest_framework'] = None\n"
        "from signing_service.client.cli import main\n"
        f"sys.exit(main(['bom', {str(model)!r}, '--signature', {str(sig)!r},"
        f" '--public-key', {str(pem)!r}, '--quiet']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert model_component(validate(done.stdout))["name"] == "resnet"
