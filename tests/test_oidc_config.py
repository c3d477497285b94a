"""The OIDC configuration file: a bad one stops start-up with the field named (like the policy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from signing_service.oidc_config import OidcConfigError, parse_oidc_config
from signing_service.policy import current_policy

ROOT = Path(__file__).resolve().parent.parent


def github(**overrides: Any) -> dict[str, Any]:
    issuer = {
        "kind": "github",
        "issuer": "https://token.actions.githubusercontent.com",
        "audience": "https://sign.example.com",
        "identity": "repo:{repository}:environment:{environment}",
        "repository_owner_ids": ["1342004"],
    }
    issuer.update(overrides)
    return {k: v for k, v in issuer.items() if v is not None}


def parse(issuer: dict[str, Any] | None = None, **top: Any) -> Any:
    doc = {"oidc": {"issuers": {"github": issuer if issuer is not None else github()}, **top}}
    return parse_oidc_config(yaml.safe_dump(doc).encode(), current_policy())


def refusal(issuer: dict[str, Any] | None = None, **top: Any) -> str:
    with pytest.raises(OidcConfigError) as exc:
        parse(issuer, **top)
    return str(exc.value)


def test_a_github_issuer_gets_the_github_claims_and_safe_defaults() -> None:
    config = parse(github(repository_ids=[98765]), require_oidc=["production"])
    issuer = config.issuer("https://token.actions.githubusercontent.com")
    assert issuer is not None
    assert issuer.actor_claim == "actor" and issuer.repository_claim == "repository"
    assert issuer.refuse_pull_requests is True
    assert issuer.repository_ids == frozenset({"98765"})  # YAML numbers become claim strings
    assert issuer.identity.claims == ("repository", "environment")
    assert issuer.identity.separators == frozenset(":")
    assert issuer.authorities is None and issuer.max_token_lifetime_seconds == 3600
    assert config.require_oidc == frozenset({"production"}) and config.leeway_seconds == 60


@pytest.mark.parametrize(
    ("issuer", "top", "field"),
    [
        (github(issuer="http://issuer.example.com"), {}, "oidc.issuers.github.issuer"),
        (github(issuer="https://x.test/?a=1"), {}, "oidc.issuers.github.issuer"),
        (github(audience=""), {}, "oidc.issuers.github.audience"),
        (github(audience=None), {}, "oidc.issuers.github.audience"),
        (github(kind="jenkins"), {}, "oidc.issuers.github.kind"),
        (github(repository_owner_ids=None), {}, "oidc.issuers.github.repository_owner_ids"),
        (github(identity="static"), {}, "oidc.issuers.github.identity"),
        (github(identity="{repository}{ref}"), {}, "oidc.issuers.github.identity"),
        (github(identity="{repository!r}:{ref}"), {}, "oidc.issuers.github.identity"),
        (github(identity="{a.b}"), {}, "oidc.issuers.github.identity"),
        (github(requires_aproval=True), {}, "oidc.issuers.github.requires_aproval"),
        (github(authorities=["prod"]), {}, "oidc.issuers.github.authorities[0]"),
        (github(required_claims={"aud": ["x"]}), {}, "oidc.issuers.github.required_claims.aud"),
        (github(required_claims={"ref": []}), {}, "oidc.issuers.github.required_claims.ref"),
        (github(max_token_lifetime_seconds=10), {}, "oidc.issuers.github.max_token_lifetime"),
        (github(refuse_pull_requests="no"), {}, "oidc.issuers.github.refuse_pull_requests"),
        (github(kind="generic"), {}, "oidc.issuers.github.repository_owner_ids"),
        (
            github(kind="generic", repository_owner_ids=None, refuse_pull_requests=True),
            {},
            "oidc.issuers.github.refuse_pull_requests",
        ),
        (
            github(kind="generic", repository_owner_ids=None, allowed_repositories=["a/*"]),
            {},
            "oidc.issuers.github.allowed_repositories",
        ),
        (None, {"leeway_seconds": 120}, "oidc.leeway_seconds"),
        (None, {"require_oidc": ["prod"]}, "oidc.require_oidc[0]"),
        (None, {"require_oidc": "production"}, "oidc.require_oidc"),
        (None, {"jwks_cache_secs": 10}, "oidc.jwks_cache_secs"),
    ],
)
def test_a_bad_field_is_named(issuer: Any, top: dict[str, Any], field: str) -> None:
    assert refusal(issuer, **top).startswith(field)


def test_no_issuer_and_two_names_for_one_issuer_are_refused() -> None:
    with pytest.raises(OidcConfigError, match=r"^oidc\.issuers: declares no issuer"):
        parse_oidc_config(b"oidc: {issuers: {}}", current_policy())
    doc = {"oidc": {"issuers": {"a": github(), "b": github()}}}
    with pytest.raises(OidcConfigError, match=r"^oidc\.issuers\.b\.issuer: .* already configured"):
        parse_oidc_config(yaml.safe_dump(doc).encode(), current_policy())


def test_http_is_allowed_on_loopback_only() -> None:
    assert parse(github(issuer="http://127.0.0.1:8080/gh")).issuer("http://127.0.0.1:8080/gh")
    assert "must use https" in refusal(github(issuer="http://10.0.0.1/gh"))


def test_a_bad_file_stops_the_service_at_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "oidc.yaml"
    bad.write_text(yaml.safe_dump({"oidc": {"issuers": {"github": github(audience=None)}}}))
    env = {**os.environ, "OIDC_CONFIG_FILE": str(bad)}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "OIDC_CONFIG_FILE is invalid: oidc.issuers.github.audience: is required" in result.stderr


# --- the shipped examples agree with each other ----------------------------------------


def test_the_example_config_fits_the_example_policy_and_ci_files() -> None:
    from signing_service.oidc import render_identity
    from signing_service.oidc_config import load_oidc_config
    from signing_service.policy import load_policy

    policy = load_policy(ROOT / "deploy" / "policy.example.yaml")
    config = load_oidc_config(ROOT / "deploy" / "oidc.example.yaml", policy)
    github_cfg = config.issuer("https://token.actions.githubusercontent.com")
    gitlab_cfg = config.issuer("https://gitlab.example.com")
    assert github_cfg is not None and gitlab_cfg is not None
    assert config.require_oidc == frozenset({"production"})

    workflow = yaml.safe_load((ROOT / "deploy" / "ci" / "github-actions.yml").read_text())
    job = workflow["jobs"]["sign"]
    assert job["permissions"]["id-token"] == "write"
    sign = next(s["run"] for s in job["steps"] if s.get("name") == "Sign the model")
    assert "--oidc " in sign and f"--environment {job['environment']}" in sign
    assert job["env"]["SIGNING_URL"] == github_cfg.audience
    claims = {"repository": "acme/models", "environment": job["environment"]}
    staging = policy.authorities["staging"]
    assert staging.allows_signer(render_identity(github_cfg, claims))

    gitlab_job = yaml.safe_load((ROOT / "deploy" / "ci" / "gitlab-ci.yml").read_text())[
        "sign-model"
    ]
    assert gitlab_job["id_tokens"]["MODELSIGN_ID_TOKEN"]["aud"] == gitlab_cfg.audience
    assert any(
        "--oidc" in line and "--environment staging" in line for line in gitlab_job["script"]
    )
    claims = {"project_path": "ml/models", "ref_type": "branch", "ref": "main"}
    assert staging.allows_signer(render_identity(gitlab_cfg, claims))
