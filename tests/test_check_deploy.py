"""`manage.py check --deploy` with the production settings: no warnings.

As the Makefile's lint target runs it, and with the environment the Kubernetes manifests give
the web pods (their secret files made here). The compose stack turns the HTTPS redirect off on
purpose (TLS ends at the operator's proxy in front of 127.0.0.1:8000): that one warning and
no other.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import yaml

from tests.redis_fixtures import ROOT

K8S = ROOT / "deploy" / "kubernetes" / "service"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"


def check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def warnings_of(done: subprocess.CompletedProcess[str]) -> set[str]:
    return set(re.findall(r"\(([a-z_]+\.[WE]\d+)\)", done.stdout + done.stderr))


def secret_files(tmp_path: Path, directory: str) -> dict[str, Path]:
    """The files the manifests mount, with real-looking values, under tmp_path."""
    values = {
        "secret_key": secrets.token_urlsafe(64),
        "database_url": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "redis_url": "redis://127.0.0.1:1/0",
        "metrics_token": secrets.token_urlsafe(32),
    }
    root = tmp_path / directory.strip("/")
    root.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (root / name).write_text(value + "\n")
    return {name: root / name for name in values}


def test_the_lint_targets_production_settings_pass_with_no_warnings(tmp_path: Path) -> None:
    done = check_deploy(
        {
            "MODELSIGN_ENV": "production",
            "SECRET_KEY": secrets.token_urlsafe(64),
            "ALLOWED_HOSTS": "signing.example.com",
            "VAR_DIR": str(tmp_path),
        }
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    assert warnings_of(done) == set()


def test_the_kubernetes_web_pods_settings_pass_with_no_warnings(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    config = next(g for g in kustomization["configMapGenerator"] if g["name"] == "modelsign-config")
    env = dict(item.split("=", 1) for item in config["literals"])
    web = yaml.safe_load_all((K8S / "web.yaml").read_text())
    container = next(d for d in web if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env |= {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["ALLOWED_HOSTS"] = env["ALLOWED_HOSTS"].replace("$(POD_IP)", "10.1.2.3")
    files = secret_files(tmp_path, "run/secrets/modelsign")
    for name, value in list(env.items()):
        if value.startswith("/run/secrets/modelsign/"):
            env[name] = str(files[Path(value).name])
        elif value.startswith(("/var/lib/modelsign", "/var/run/prometheus")):
            env[name] = str(tmp_path / value.strip("/"))
    env["SIGNING_POLICY_FILE"] = str(K8S / "policy.yaml")
    env["PKCS11_PIN_FILE"] = str(tmp_path / "no-pin-needed-for-the-check")
    assert env["MODELSIGN_ENV"] == "production" and "SECURE_SSL_REDIRECT" not in env
    done = check_deploy(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert warnings_of(done) == set()


def test_compose_differs_only_by_the_https_redirect_left_to_the_proxy(tmp_path: Path) -> None:
    declared = yaml.safe_load(COMPOSE.read_text())["services"]["web"]["environment"]
    files = secret_files(tmp_path, "run/secrets")
    env = {}
    for name, value in declared.items():
        value = str(value).replace("${MODELSIGN_HOSTNAME:-localhost}", "sign.example.com")
        if value.startswith("/run/secrets/") and Path(value).name in files:
            value = str(files[Path(value).name])
        elif value.startswith(("/var/lib/modelsign", "/tmp/prometheus")):
            value = str(tmp_path / value.strip("/"))
        env[name] = value
    env["SIGNING_POLICY_FILE"] = str(COMPOSE.parent / "policy.yaml")
    done = check_deploy(env)
    assert done.returncode == 1
    assert warnings_of(done) == {"security.W008"}, done.stdout + done.stderr
