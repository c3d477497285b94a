"""The policy file is validated at start-up; a bad file names the field and the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from signing_service.policy import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "policy.example.yaml"


def test_the_spec_example_and_the_local_default_load() -> None:
    for path in (EXAMPLE, ROOT / "deploy" / "local" / "policy.yaml"):
        policy = load_policy(path)
        production = policy.authorities["production"]
        assert production.requires_approval and production.approval_count == 2
        assert policy.key_management.ceremony_quorum == 2
    example = load_policy(EXAMPLE)
    assert example.authorities["staging"].backend == "vault"
    assert example.authorities["development"].backend == "sigstore"
    assert example.verification["production_deployment"].max_signature_age_days == 90


def mutate(path: list[str], value: object) -> bytes:
    doc = yaml.safe_load(EXAMPLE.read_bytes())
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return yaml.safe_dump(doc).encode()


SA = ["certificate_policy", "signing_authorities"]
BAD = [
    ([*SA, "production", "key_algorithm"], "RSA-2048",
     "certificate_policy.signing_authorities.production.key_algorithm: must be one of"),
    ([*SA, "production", "requires_aproval"], True,
     "certificate_policy.signing_authorities.production.requires_aproval: is not a known field"),
    ([*SA, "production", "requires_approval"], "yes",
     "production.requires_approval: must be true or false"),
    ([*SA, "production", "approval_count"], 0, "production.approval_count: must be between 1 and 10"),
    ([*SA, "production", "key_storage"], "floppy", "production.key_storage: must be HSM or vault"),
    ([*SA, "production", "key_rotation"], "sometimes", "production.key_rotation: must be annual"),
    ([*SA, "production", "authorized_signers"], [], "authorized_signers: must list at least one"),
    ([*SA, "production", "authorized_signers"], ["*"], "authorized_signers[0]: '*' would match every"),
    ([*SA, "staging", "authorized_signers"], KeyError, "staging.authorized_signers: is required"),
    ([*SA, "development", "provider"], "notary", "development.provider: must be sigstore"),
    ([*SA, "development", "requires_approval"], True,
     "development.requires_approval: keyless authorities sign while the request is made"),
    ([*SA, "Prod"], {"type": "key-based"}, "authority names are lowercase"),
    (["certificate_policy", "verification_policy", "production_deployment", "accepted_authorities"],
     ["prod"], "production_deployment.accepted_authorities[0]: unknown authority 'prod'"),
    (["certificate_policy", "key_management", "ceremony_quorum"], 1,
     "key_management.ceremony_quorum: must be between 2 and 10"),
    (["certificate_policy", "version"], KeyError, "certificate_policy.version: is required"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[m for _, _, m in BAD])
def test_invalid_policies_name_the_field(path: list[str], value: object, message: str) -> None:
    with pytest.raises(PolicyError) as excinfo:
        parse_policy(mutate(path, value))
    assert message in str(excinfo.value)


def test_not_yaml_is_refused() -> None:
    with pytest.raises(PolicyError, match="not valid YAML"):
        parse_policy(b"certificate_policy: [unclosed")


def test_a_missing_approval_count_means_two_not_one() -> None:
    policy = parse_policy(mutate([*SA, "production", "approval_count"], KeyError))
    assert policy.authorities["production"].approval_count == 2


def test_the_service_refuses_to_start_with_a_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_bytes(mutate([*SA, "production", "key_algorithm"], "DSA"))
    env = {**os.environ, "SIGNING_POLICY_FILE": str(bad), "VAR_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "signing policy is invalid" in result.stderr
    assert "production.key_algorithm: must be one of" in result.stderr
