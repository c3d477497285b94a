"""deploy/softhsm/setup.sh for real: SoftHSM2 tokens in a temporary configuration."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from keys import softhsm
from tests.redis_fixtures import ROOT

pytestmark = pytest.mark.softhsm

SETUP = ROOT / "deploy" / "softhsm" / "setup.sh"
POLICY = ROOT / "deploy" / "compose" / "policy.yaml"
EXPECTED = {
    "modelsign-production",
    "modelsign-staging",
    "modelsign-development",
    "modelsign-audit-checkpoint",
}


def pin_file(path: Path, pin: str | None = None) -> Path:
    path.write_text((pin or secrets.token_hex(8)) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PYTHON": sys.executable,
        "SOFTHSM_DIR": str(tmp_path / "softhsm"),
        "SIGNING_POLICY_FILE": str(POLICY),
        "PKCS11_PIN_FILE": str(pin_file(tmp_path / "user.pin")),
        "SOFTHSM_SO_PIN_FILE": str(pin_file(tmp_path / "so.pin")),
        "AUDIT_CHECKPOINT_PIN_FILE": str(pin_file(tmp_path / "audit.pin")),
    }


def setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SETUP)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def pins(env: dict[str, str]) -> list[str]:
    return [
        Path(env[name]).read_text().strip()
        for name in env
        if name.endswith("PIN_FILE") or name.startswith("PKCS11_PIN_FILE_")
    ]


def test_it_creates_one_token_per_hsm_authority_and_the_checkpoint_token(
    env: dict[str, str],
) -> None:
    first = setup(env)
    assert first.returncode == 0, first.stderr
    conf = Path(env["SOFTHSM_DIR"]) / "softhsm2.conf"
    assert set(softhsm.list_tokens(conf)) == EXPECTED
    assert first.stdout.count(": created") == 4
    for pin in pins(env):
        assert pin not in first.stdout + first.stderr


def test_a_second_run_changes_nothing(env: dict[str, str]) -> None:
    assert setup(env).returncode == 0
    conf = Path(env["SOFTHSM_DIR"]) / "softhsm2.conf"
    tokens_dir = Path(env["SOFTHSM_DIR"]) / "tokens"
    before = sorted(p.name for p in tokens_dir.iterdir())
    again = setup(env)
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout
    assert again.stdout.count("exists, PIN file opens it") == 4
    assert sorted(p.name for p in tokens_dir.iterdir()) == before
    assert sorted(softhsm.list_tokens(conf)) == sorted(EXPECTED)  # no duplicate labels


def test_a_wrong_pin_file_is_refused_and_named(env: dict[str, str], tmp_path: Path) -> None:
    assert setup(env).returncode == 0
    wrong = pin_file(tmp_path / "wrong.pin", "not-the-pin-0000")
    refused = setup({**env, "PKCS11_PIN_FILE_STAGING": str(wrong)})
    assert refused.returncode == 1
    assert f"the PIN in {wrong} does not open token 'modelsign-staging'" in refused.stderr
    assert "not-the-pin-0000" not in refused.stdout + refused.stderr


def test_a_wrong_pin_changes_nothing_even_with_a_new_authority(
    env: dict[str, str], tmp_path: Path
) -> None:
    # The staging token exists; a new label for production would be created, but the wrong
    # staging PIN is found first and the run stops before creating anything.
    assert setup(env).returncode == 0
    conf = Path(env["SOFTHSM_DIR"]) / "softhsm2.conf"
    wrong = pin_file(tmp_path / "wrong.pin")
    refused = setup(
        {**env, "PKCS11_PIN_FILE_STAGING": str(wrong), "PKCS11_TOKEN_PRODUCTION": "prod-2"}
    )
    assert refused.returncode == 1
    assert "prod-2" not in softhsm.list_tokens(conf)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("PKCS11_PIN_FILE", "PKCS11_PIN_FILE must be set"),
        ("SOFTHSM_SO_PIN_FILE", "SOFTHSM_SO_PIN_FILE must be set"),
        ("SIGNING_POLICY_FILE", "SIGNING_POLICY_FILE must be set"),
    ],
)
def test_missing_settings_are_named(env: dict[str, str], missing: str, message: str) -> None:
    refused = setup({k: v for k, v in env.items() if k != missing})
    assert refused.returncode == 1
    assert message in refused.stderr
    assert not (Path(env["SOFTHSM_DIR"]) / "tokens").exists() or not softhsm.list_tokens(
        Path(env["SOFTHSM_DIR"]) / "softhsm2.conf"
    )


def test_an_unreadable_pin_file_is_named(env: dict[str, str], tmp_path: Path) -> None:
    refused = setup({**env, "AUDIT_CHECKPOINT_PIN_FILE": str(tmp_path / "absent.pin")})
    assert refused.returncode == 1
    assert "absent.pin" in refused.stderr


def test_one_token_with_two_pin_files_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    other = pin_file(tmp_path / "other.pin")
    refused = setup(
        {**env, "PKCS11_TOKEN_STAGING": "shared", "PKCS11_TOKEN_PRODUCTION": "shared",
         "PKCS11_PIN_FILE_STAGING": str(other)}
    )  # fmt: skip
    assert refused.returncode == 1
    assert "token 'shared' is named for authority production" in refused.stderr
