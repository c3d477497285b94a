"""`modelsign verify` accepts bundles made by the reference model_signing CLI, and names
every way a model or bundle can be wrong."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signing_service.client import cli

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[1]
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"
MODEL_FILES = {
    "weights.bin": bytes(range(256)) * 64,
    "config.json": b'{"layers": 2}',
    "tokenizer/vocab.txt": "hello\nwörld\n".encode(),
    "logs/train.log": b"epoch 1\n",
    ".git/HEAD": b"ref: refs/heads/main\n",
}


def write_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path.with_suffix(".pub")


def make_model(root: Path) -> Path:
    for name, data in MODEL_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def reference_sign(model: Path, signature: Path, key: Path, *ignore: Path) -> None:
    args = [str(MODEL_SIGNING), "sign", "key", str(model), "--signature", str(signature)]
    args += ["--private_key", str(key)]
    for path in ignore:
        args += ["--ignore-paths", str(path)]
    subprocess.run(args, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One model signed by model_signing: (model, signature outside it, public key)."""
    tmp = tmp_path_factory.mktemp("signed")
    public = write_key(tmp / "key.pem")
    model = make_model(tmp / "model")
    reference_sign(model, tmp / "model.sig", tmp / "key.pem")
    return model, tmp / "model.sig", public


@pytest.fixture
def copy(signed: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private copy of the signed model that a test may damage."""
    model, signature, public = signed
    shutil.copytree(model, tmp_path / "model")
    shutil.copy(signature, tmp_path / "model.sig")
    return tmp_path / "model", tmp_path / "model.sig", public


def verify(model: Path, signature: Path, public: Path, *extra: str) -> int:
    argv = ["verify", str(model), "--signature", str(signature), "--public-key", str(public)]
    return cli.main([*argv, "--quiet", *extra])


def test_reference_bundle_verifies(
    copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(*copy) == 0
    assert capsys.readouterr().out.strip() == "Verification succeeded"


def test_reference_bundle_verifies_via_python_m(copy: tuple[Path, Path, Path]) -> None:
    model, signature, public = copy
    argv = [sys.executable, "-m", "signing_service.client", "verify", str(model)]
    argv += ["--signature", str(signature), "--public-key", str(public)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Verification succeeded" in done.stdout


def test_ignored_files_may_change(copy: tuple[Path, Path, Path]) -> None:
    model, signature, public = copy
    (model / ".git" / "HEAD").write_text("changed")
    (model / ".gitignore").write_text("new but ignored")
    assert verify(model, signature, public) == 0


def test_one_changed_byte(
    copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, signature, public = copy
    data = bytearray((model / "weights.bin").read_bytes())
    data[1000] ^= 1
    (model / "weights.bin").write_bytes(data)
    assert verify(model, signature, public) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "changed file: weights.bin" in x)
    signed_digest = _statement(signature)["predicate"]["resources"]
    expected = next(r["digest"] for r in signed_digest if r["name"] == "weights.bin")
    assert expected in line and hashlib.sha256(data).hexdigest() in line
    assert "verification failed" in err


def test_extra_file(copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, signature, public = copy
    (model / "tokenizer" / "merges.txt").write_text("extra")
    assert verify(model, signature, public) == 1
    assert "extra file (not in the signature): tokenizer/merges.txt" in capsys.readouterr().err


def test_missing_file(copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, signature, public = copy
    (model / "config.json").unlink()
    assert verify(model, signature, public) == 1
    assert "missing file (in the signature): config.json" in capsys.readouterr().err


def test_wrong_public_key(
    copy: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, signature, _ = copy
    other = write_key(tmp_path / "other.pem")
    assert verify(model, signature, other) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "key hint does not match" in err


def test_wrong_public_key_without_hint(
    copy: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, signature, _ = copy
    bundle = json.loads(signature.read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    signature.write_text(json.dumps(bundle))
    assert verify(model, signature, write_key(tmp_path / "other.pem")) == 1
    assert "signature does not verify" in capsys.readouterr().err


def test_tampered_payload(
    copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, signature, public = copy
    # Re-sign nothing: claim the model's current (changed) content in the payload.
    (model / "config.json").write_bytes(b'{"layers": 3}')
    bundle = json.loads(signature.read_text())
    statement = _statement(signature)
    for r in statement["predicate"]["resources"]:
        if r["name"] == "config.json":
            r["digest"] = hashlib.sha256(b'{"layers": 3}').hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    signature.write_text(json.dumps(bundle))
    assert verify(model, signature, public) == 1
    assert "signature does not verify" in capsys.readouterr().err


def test_garbage_bundle(copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, signature, public = copy
    signature.write_text("not json")
    assert verify(model, signature, public) == 1
    err = capsys.readouterr().err
    assert "bundle is not JSON" in err and "Traceback" not in err


def test_signature_inside_model_and_recorded_ignore_paths(tmp_path: Path) -> None:
    public = write_key(tmp_path / "key.pem")
    model = make_model(tmp_path / "model")
    signature = model / "model.sig"
    reference_sign(model, signature, tmp_path / "key.pem", model / "logs")
    recorded = _statement(signature)["predicate"]["serialization"]["ignore_paths"]
    assert {"logs", "model.sig"} <= set(recorded)
    (model / "logs" / "new.log").write_text("logs change after signing")
    assert verify(model, signature, public) == 0
    (model / "logs.txt").write_text("not ignored")
    assert verify(model, signature, public) == 1


def test_user_ignore_paths_on_verify(copy: tuple[Path, Path, Path]) -> None:
    model, signature, public = copy
    (model / "scratch").mkdir()
    (model / "scratch" / "tmp").write_text("local only")
    assert verify(model, signature, public) == 1
    assert verify(model, signature, public, "--ignore-paths", str(model / "scratch")) == 0


def _statement(signature: Path) -> dict:  # type: ignore[type-arg]
    bundle = json.loads(signature.read_text())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
