"""provenance_builders in the policy file: globs on SLSA builder ids, validated by field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from signing_service.policy import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "policy.example.yaml"
WHERE = "certificate_policy.signing_authorities"
GENERATOR = (
    "https://github.com/slsa-framework/slsa-github-generator/.github/workflows/"
    "generator_generic_slsa3.yml@refs/tags/v2.0.0"
)


def with_builders(authority: str, value: object) -> bytes:
    doc = yaml.safe_load(EXAMPLE.read_bytes())
    doc["certificate_policy"]["signing_authorities"][authority]["provenance_builders"] = value
    return yaml.safe_dump(doc).encode()


def test_the_shipped_policies_allow_the_slsa_generator_for_key_based_authorities() -> None:
    for path in (EXAMPLE, ROOT / "deploy" / "local" / "policy.yaml"):
        policy = load_policy(path)
        assert policy.authorities["production"].allows_builder(GENERATOR)
        assert policy.authorities["staging"].allows_builder(GENERATOR)
        assert not policy.authorities["development"].provenance_builders


def test_builder_globs_match_the_whole_id_case_sensitively() -> None:
    policy = parse_policy(with_builders("production", ["https://ci.company.com/builders/*"]))
    production = policy.authorities["production"]
    assert production.allows_builder("https://ci.company.com/builders/gpu-1")
    assert not production.allows_builder("https://CI.company.com/builders/gpu-1")
    assert not production.allows_builder("evil+https://ci.company.com/builders/gpu-1")
    assert not production.allows_builder(GENERATOR)


@pytest.mark.parametrize(
    ("authority", "value", "expected"),
    [
        ("production", [], "production.provenance_builders: must list at least one builder"),
        ("production", "https://ci/*", "production.provenance_builders: must be a list"),
        ("production", ["*"], "production.provenance_builders[0]: '*' would match every builder"),
        ("production", ["ok", 7.5], None),  # numbers are coerced like other string lists
        ("production", ["ok", ""], "production.provenance_builders[1]: must be a non-empty string"),
        ("development", ["https://ci/*"], "development.provenance_builders: keyless authorities"),
    ],
    ids=["empty", "not-a-list", "match-all", "number", "blank", "keyless"],
)
def test_bad_builder_lists_name_the_field(authority: str, value: object, expected: str) -> None:
    raw = with_builders(authority, value)
    if expected is None:
        assert parse_policy(raw).authorities[authority].provenance_builders == ("ok", "7.5")
        return
    with pytest.raises(PolicyError) as caught:
        parse_policy(raw)
    assert f"{WHERE}." in str(caught.value) and expected in str(caught.value)
