"""The deployment files agree with the code: the container image definition, the compose
stack and the Kubernetes manifests, read with PyYAML (no container engine or cluster runs on
the build machines; tests/test_deploy_stack.py runs their entrypoint end to end on the host).

Every environment variable they set is one the service or its scripts read; every secret
file they name is declared and mounted; every role they run is one entrypoint.sh has; probes
point at the service's real paths; the policy they ship loads with the service's own loader.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml
from django.urls import Resolver404, resolve

from signing_service.policy import load_policy
from tests.redis_fixtures import ROOT

DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "container" / "entrypoint.sh"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "kubernetes" / "service"
APP_SERVICES = ("init", "web", "worker", "beat")
#: Variables read per authority (keys/registry.py): a prefix and the authority's name.
PER_AUTHORITY_PREFIXES = ("PKCS11_TOKEN_", "PKCS11_PIN_FILE_")


# -- what the code reads -----------------------------------------------------------------


@cache
def env_names_read() -> frozenset[str]:
    """Names the settings module, the code and the deploy scripts read from the environment."""
    names: set[str] = set()
    settings = (ROOT / "signing_service" / "settings.py").read_text()
    for helper, name in re.findall(
        r'env_(str|bool|int|list|path|secret)\(\s*"([A-Z0-9_]+)"', settings
    ):
        names.add(name)
        if helper == "secret":
            names.add(f"{name}_FILE")
    code = [*ROOT.glob("signing_service/**/*.py"), *ROOT.glob("keys/**/*.py"),
            *ROOT.glob("worker/**/*.py"), DEPLOY / "gunicorn.conf.py",
            DEPLOY / "softhsm" / "init_tokens.py"]  # fmt: skip
    for path in code:
        text = path.read_text()
        names |= set(re.findall(r'os\.environ(?:\.get)?[(\[]\s*"([A-Z0-9_]+)"', text))
        names |= set(re.findall(r'_required_path\(\s*"([A-Z0-9_]+)"', text))
    # entrypoint.sh and setup.sh: ${NAME:-default}, ${NAME:?...}, ${NAME:-} reads.
    for script in (ENTRYPOINT, DEPLOY / "softhsm" / "setup.sh"):
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::[-?=])", script.read_text()))
    return frozenset(names)


def is_read(name: str) -> bool:
    if name in env_names_read():
        return True
    return any(name.startswith(p) and len(name) > len(p) for p in PER_AUTHORITY_PREFIXES)


@cache
def secret_file_names() -> frozenset[str]:
    """The variables that name a file holding a secret (a PIN, a password, a token)."""
    settings = (ROOT / "signing_service" / "settings.py").read_text()
    names = {f"{n}_FILE" for n in re.findall(r'env_secret\(\s*"([A-Z0-9_]+)"', settings)}
    return frozenset(
        names | {n for n in env_names_read() if re.search(r"(PIN|SECRET_ID|TOKEN)_FILE$", n)}
    )


def is_secret_file(name: str) -> bool:
    return name in secret_file_names() or name.startswith("PKCS11_PIN_FILE_")


@cache
def entrypoint_roles() -> frozenset[str]:
    script = ENTRYPOINT.read_text()
    body = script[script.index('case "$role" in') :]
    return frozenset(re.findall(r"^  ([a-z][a-z-]*)\)", body, re.MULTILINE))


def test_the_scan_of_names_read_finds_what_it_must() -> None:
    # Guards the scanner itself: a regex that silently matched nothing would pass everything.
    for name in ("SECRET_KEY_FILE", "DATABASE_URL_FILE", "REDIS_URL_FILE", "PKCS11_PIN_FILE",
                 "SOFTHSM_DIR", "VAULT_SECRET_ID_FILE", "PROMETHEUS_MULTIPROC_DIR",
                 "WEB_CONCURRENCY", "BIND", "SOFTHSM_SO_PIN_FILE", "SIGNING_MODE"):  # fmt: skip
        assert is_read(name), name
    assert is_read("PKCS11_TOKEN_STAGING") and not is_read("PKCS11_TOKEN_")
    assert not is_read("SECRET_KEYS_FILE") and not is_read("DATABASE_PASSWORD")
    assert {"SECRET_KEY_FILE", "PKCS11_PIN_FILE", "SOFTHSM_SO_PIN_FILE", "VAULT_SECRET_ID_FILE",
            "AUDIT_CHECKPOINT_PIN_FILE", "METRICS_TOKEN_FILE"} <= secret_file_names()  # fmt: skip
    assert not is_secret_file("SIGNING_POLICY_FILE") and is_secret_file("PKCS11_PIN_FILE_PROD")
    assert entrypoint_roles() >= {
        "web",
        "worker",
        "beat",
        "migrate",
        "init-softhsm",
        "init",
        "manage",
    }


# -- the image ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_is_slim_bookworm_python_runs_as_a_user_and_bakes_in_no_secret() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for op, arg in instructions:
        if op in ("ENV", "ARG"):
            for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", arg):
                assert not re.search(
                    r"SECRET|PASSWORD|PIN$|TOKEN$|DATABASE_URL$", name
                ) or name.endswith("_FILE"), f"{op} {name} bakes a secret into the image"
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "softhsm2" in runs and "--no-install-recommends" in runs and "opensc" not in runs
    assert "pip install '.[server]'" in runs
    assert "manage.py collectstatic" in runs
    assert any(op == "HEALTHCHECK" and "healthcheck" in arg for op, arg in instructions)


def test_the_image_copies_every_package_the_install_needs() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set()
    for op, arg in dockerfile():
        if op == "COPY":
            *sources, _ = shlex.split(arg)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                copied.add(source.rstrip("/"))
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    assert {"manage.py", "deploy", "pyproject.toml"} <= copied


def test_the_image_entrypoint_and_command_are_entrypoint_roles() -> None:
    instructions = dict(dockerfile())
    entry = yaml.safe_load(instructions["ENTRYPOINT"])
    assert entry == ["/app/deploy/container/entrypoint.sh"]
    assert (ROOT / PurePosixPath(entry[0]).relative_to("/app")).stat().st_mode & 0o111
    assert yaml.safe_load(instructions["CMD"])[0] in entrypoint_roles()


# -- compose -----------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def test_compose_has_every_service_and_app_services_run_entrypoint_roles() -> None:
    assert set(services()) == {"postgres", "redis", *APP_SERVICES}
    images = {services()[name]["image"] for name in APP_SERVICES}
    assert images == {"modelsign:latest"}
    builds = [s["build"] for s in services().values() if "build" in s]
    assert builds == [{"context": "../..", "dockerfile": "deploy/container/Dockerfile"}]
    assert (COMPOSE.parent / builds[0]["context"] / builds[0]["dockerfile"]).is_file()
    for name in APP_SERVICES:
        command = services()[name]["command"]
        assert command[0] in entrypoint_roles(), f"{name}: {command}"
        assert command[0] == name  # the service is named for its role


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_sets_only_env_names_the_service_reads(name: str) -> None:
    unknown = sorted(n for n in services()[name]["environment"] if not is_read(n))
    assert unknown == []


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_secrets_are_files_that_are_declared_and_mounted(name: str) -> None:
    service = services()[name]
    env = service["environment"]
    declared = compose()["secrets"]
    for var, value in env.items():
        # Secrets only ever as *_FILE: the value never sits in the environment.
        assert var not in ("SECRET_KEY", "DATABASE_URL", "METRICS_TOKEN", "REDIS_PASSWORD")
        if is_secret_file(var) or str(value).startswith("/run/secrets/"):
            secret = PurePosixPath(value)
            assert secret.parent == PurePosixPath("/run/secrets"), f"{name}: {var}={value}"
            assert secret.name in service["secrets"], f"{name}: {var} names an unmounted secret"
            assert secret.name in declared
    for secret in service["secrets"]:
        source = PurePosixPath(declared[secret]["file"])
        assert source.parent == PurePosixPath("secrets")  # deploy/compose/secrets/, git-ignored
    assert (COMPOSE.parent / "secrets" / ".gitignore").read_text().splitlines()[1:] == [
        "*",
        "!.gitignore",
    ]


def test_compose_gives_the_hsm_volume_and_pins_to_key_users_only() -> None:
    for name in ("init", "web", "worker"):
        service = services()[name]
        assert "softhsm:/var/lib/modelsign/softhsm" in service["volumes"]
        assert service["environment"]["SOFTHSM_DIR"] == "/var/lib/modelsign/softhsm"
        assert {"hsm_user_pin", "audit_checkpoint_pin"} <= set(service["secrets"])
    beat = services()["beat"]
    assert not any(v.startswith("softhsm:") for v in beat["volumes"])  # no tokens
    assert not {"hsm_user_pin", "hsm_so_pin", "audit_checkpoint_pin"} & set(beat["secrets"])
    only_init = [n for n, s in services().items() if "hsm_so_pin" in s.get("secrets", [])]
    assert only_init == ["init"]
    assert "softhsm" in compose()["volumes"]


def test_compose_starts_services_in_order_with_health_conditions() -> None:
    for name in ("postgres", "redis", "web", "worker"):
        assert services()[name]["healthcheck"]["test"], name
    assert services()["init"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("web", "worker", "beat"):
        depends = services()[name]["depends_on"]
        assert depends["init"] == {"condition": "service_completed_successfully"}
        assert depends["redis"] == {"condition": "service_healthy"}
    assert services()["init"]["restart"] == "no"
    assert services()["web"]["ports"] == ["127.0.0.1:8000:8000"]


def test_compose_policy_loads_and_names_only_hsm_authorities() -> None:
    # Every service reads the policy from a read-only bind of deploy/compose/policy.yaml at
    # the path SIGNING_POLICY_FILE names (not `configs:`, which podman-compose does not mount).
    for name in ("init", "web", "worker", "beat"):
        target = services()[name]["environment"]["SIGNING_POLICY_FILE"]
        assert f"./policy.yaml:{target}:ro" in services()[name]["volumes"], name
    assert "configs" not in compose()
    policy = load_policy(COMPOSE.parent / "policy.yaml")
    assert {a.backend for a in policy.authorities.values()} == {"pkcs11"}


# -- Kubernetes --------------------------------------------------------------------------


@cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@cache
def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for resource in kustomization()["resources"]:
        objects += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return objects


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs() -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in k8s_objects()
        if o["kind"] in ("Deployment", "Job")
    }


def generators(kind: str) -> dict[str, list[str]]:
    return {
        g["name"]: [PurePosixPath(f).name for f in g.get("files", [])]
        for g in kustomization()[f"{kind}Generator"]
    }


def config_literals() -> dict[str, str]:
    literals = next(
        g for g in kustomization()["configMapGenerator"] if g["name"] == "modelsign-config"
    )
    return dict(item.split("=", 1) for item in literals["literals"])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = dict(config_literals()) if container.get("envFrom") else {}
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from field>")
    return env


def test_the_kustomization_lists_files_that_exist() -> None:
    for resource in kustomization()["resources"]:
        assert (K8S / resource).is_file(), resource
    for generator in kustomization()["configMapGenerator"]:
        for f in generator.get("files", []):
            assert (K8S / f).is_file(), f
    secret_files = [f for g in kustomization()["secretGenerator"] for f in g["files"]]
    assert all(PurePosixPath(f).parent == PurePosixPath("secrets") for f in secret_files)
    assert (K8S / "secrets" / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]
    assert [i["name"] for i in kustomization()["images"]] == ["modelsign"]
    assert kustomization()["namespace"] == "modelsign"


def test_every_configmap_and_secret_reference_is_generated() -> None:
    secrets, maps = generators("secret"), generators("configMap")
    for name, spec in pod_specs().items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            for var, value in container_env(container).items():
                if not is_secret_file(var) and not value.startswith("/run/secrets/"):
                    continue
                path = PurePosixPath(value)
                volume = mounts.get(str(path.parent))
                assert volume is not None, f"{name}: {var}={value} is on no mounted volume"
                if "secret" in volume:
                    assert path.name in secrets[volume["secret"]["secretName"]], f"{name}: {var}"
                else:
                    assert path.name in maps[volume["configMap"]["name"]], f"{name}: {var}"
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps
            if "persistentVolumeClaim" in volume:
                k8s("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_every_k8s_env_name_is_one_the_service_reads_and_roles_exist() -> None:
    assert sorted(n for n in config_literals() if not is_read(n)) == []
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            extra = [e["name"] for e in container.get("env", []) if e["name"] != "POD_IP"]
            assert sorted(n for n in extra if not is_read(n)) == [], name
            assert container["image"] == "modelsign"
            assert container["args"][0] in entrypoint_roles(), name


def test_the_policy_in_the_configmap_loads_where_the_service_reads_it() -> None:
    policy_file = PurePosixPath(config_literals()["SIGNING_POLICY_FILE"])
    assert generators("configMap")["modelsign-policy"] == [policy_file.name]
    policy = load_policy(K8S / policy_file.name)
    assert "staging" in policy.authorities
    for name, spec in pod_specs().items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert (
            volumes[mounts[str(policy_file.parent)]]["configMap"]["name"] == "modelsign-policy"
        ), name


def test_web_probes_point_at_real_paths_and_ports() -> None:
    web = k8s("Deployment", "modelsign-web")
    container = web["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["timeoutSeconds"] >= 5  # README: checks take up to 2 s each
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        try:
            resolve(get["path"])
        except Resolver404:
            pytest.fail(f"{probe} {get['path']} is no path of the service")
        assert get["port"] in ports
    assert ports["http"] == int(container_env(container)["BIND"].rsplit(":", 1)[1])
    service = k8s("Service", "modelsign-web")
    assert service["spec"]["selector"] == web["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] in ports
    worker = pod_specs()["modelsign-worker"]["containers"][0]
    assert worker["livenessProbe"]["exec"]["command"][-1] in entrypoint_roles()


def test_pods_run_as_non_root_on_a_read_only_root_with_emptydirs_where_they_write() -> None:
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        if any(v.get("secret", {}).get("defaultMode") == 0o440 for v in spec["volumes"]):
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            writable = ["/tmp", container_env(container)["VAR_DIR"]]
            if name != "modelsign-init":
                writable.append(container_env(container)["PROMETHEUS_MULTIPROC_DIR"])
            for path in writable:
                assert "emptyDir" in mounts[path], f"{name}: {path} is not an emptyDir"


def test_replicas_strategy_and_disruption_budget() -> None:
    web, beat = k8s("Deployment", "modelsign-web"), k8s("Deployment", "modelsign-beat")
    assert web["spec"]["replicas"] == 2
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    assert k8s("Job", "modelsign-init")["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "init"
    ]
    pdb = k8s("PodDisruptionBudget", "modelsign-web")
    assert pdb["spec"]["selector"]["matchLabels"] == web["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["minAvailable"] < web["spec"]["replicas"]
    for deployment in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_beat_gets_no_hsm_and_only_init_gets_the_so_pin() -> None:
    def secrets_of(spec: dict[str, Any]) -> set[str]:
        return {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}

    specs = pod_specs()
    assert secrets_of(specs["modelsign-beat"]) == {"modelsign-secrets"}
    assert not any("persistentVolumeClaim" in v for v in specs["modelsign-beat"]["volumes"])
    assert [n for n, s in specs.items() if "modelsign-hsm-so-pin" in secrets_of(s)] == [
        "modelsign-init"
    ]


def test_network_policy_web_ingress_and_egress_are_narrow() -> None:
    ingress = k8s("NetworkPolicy", "modelsign-web-ingress")["spec"]
    web_labels = k8s("Deployment", "modelsign-web")["spec"]["template"]["metadata"]["labels"]
    assert ingress["podSelector"]["matchLabels"] == web_labels
    [rule] = ingress["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"podSelector": {"matchLabels": {"app": "modelsign-admission"}}},
    ]
    closed = k8s("NetworkPolicy", "modelsign-no-ingress")["spec"]
    assert closed["ingress"] == [] and closed["policyTypes"] == ["Ingress"]
    egress = k8s("NetworkPolicy", "modelsign-egress")["spec"]
    assert egress["policyTypes"] == ["Egress"]
    ports = {p["port"] for rule in egress["egress"] for p in rule["ports"]}
    assert ports == {53, 5432, 6379, 8200, 1792}
    assert all(rule.get("to") for rule in egress["egress"])  # never "anywhere"
    selector = egress["podSelector"]["matchLabels"]
    for name in pod_specs():
        owner = next(o for o in k8s_objects() if o["metadata"]["name"] == name)
        assert selector.items() <= owner["spec"]["template"]["metadata"]["labels"].items(), name


# -- Vault: two credentials, the ceremonies' one only where ceremonies complete ------------

COMPOSE_VAULT = DEPLOY / "compose" / "compose.vault.yaml"
K8S_VAULT = K8S / "vault"
RUNTIME_VAULT = {"VAULT_ADDR", "VAULT_ROLE_ID", "VAULT_SECRET_ID_FILE"}
CEREMONY_VAULT = {"VAULT_CEREMONY_ROLE_ID", "VAULT_CEREMONY_SECRET_ID_FILE"}


@cache
def compose_vault() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_VAULT.read_text())


def test_compose_vault_overlay_gives_the_ceremony_credential_to_web_and_init_only() -> None:
    overlay = compose_vault()["services"]
    assert set(overlay) <= set(services())  # it only adds to compose.yaml's services
    assert set(overlay) == {"init", "web", "worker"}  # beat never gets a Vault credential
    declared = compose_vault()["secrets"]
    for name, service in overlay.items():
        env = service["environment"]
        assert sorted(n for n in env if not is_read(n)) == [], name
        assert RUNTIME_VAULT <= set(env), name
        for var, value in env.items():
            if is_secret_file(var):
                secret = PurePosixPath(value)
                assert secret.parent == PurePosixPath("/run/secrets"), f"{name}: {var}"
                assert secret.name in service["secrets"] and secret.name in declared
        for secret in service["secrets"]:
            assert PurePosixPath(declared[secret]["file"]).parent == PurePosixPath("secrets")
            assert secret not in compose()["secrets"]  # no clash with compose.yaml's
    ceremony = sorted(n for n, s in overlay.items() if CEREMONY_VAULT & set(s["environment"]))
    assert ceremony == ["init", "web"]  # init runs `manage key_ceremony` (README)
    assert all(CEREMONY_VAULT <= set(overlay[n]["environment"]) for n in ceremony)
    assert overlay["worker"]["secrets"] == ["vault_secret_id"]
    assert "VAULT_CEREMONY_TOKEN_FILE" not in COMPOSE_VAULT.read_text()


@cache
def k8s_vault() -> dict[str, Any]:
    return yaml.safe_load((K8S_VAULT / "kustomization.yaml").read_text())


def k8s_vault_patches() -> dict[str, dict[str, Any]]:
    patches = {}
    for patch in k8s_vault()["patches"]:
        doc = yaml.safe_load((K8S_VAULT / patch["path"]).read_text())
        patches[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
    return patches


def test_k8s_vault_component_gives_the_ceremony_credential_to_web_only() -> None:
    assert k8s_vault()["kind"] == "Component"
    secrets = {
        g["name"]: [PurePosixPath(f).name for f in g["files"]]
        for g in k8s_vault()["secretGenerator"]
    }
    for generator in k8s_vault()["secretGenerator"]:
        for f in generator["files"]:
            assert PurePosixPath(f).parent == PurePosixPath("secrets")
    assert (K8S_VAULT / "secrets" / ".gitignore").read_text().splitlines()[1:] == [
        "*",
        "!.gitignore",
    ]
    patches = k8s_vault_patches()
    assert set(patches) == {"modelsign-web", "modelsign-worker"}  # never beat or init
    base = pod_specs()
    for name, spec in patches.items():
        [container] = spec["containers"]
        assert container["name"] == base[name]["containers"][0]["name"], name
        env = {e["name"]: e["value"] for e in container["env"]}
        assert sorted(n for n in env if not is_read(n)) == [], name
        assert RUNTIME_VAULT <= set(env), name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not set(volumes) & {v["name"] for v in base[name]["volumes"]}, name
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        for var, value in env.items():
            if is_secret_file(var):
                volume = mounts[str(PurePosixPath(value).parent)]
                assert PurePosixPath(value).name in secrets[volume["secret"]["secretName"]]
        given = {v["secret"]["secretName"] for v in volumes.values()}
        assert given <= set(secrets), name
    web_env = {e["name"] for e in patches["modelsign-web"]["containers"][0]["env"]}
    worker = patches["modelsign-worker"]
    assert CEREMONY_VAULT <= web_env
    assert not CEREMONY_VAULT & {e["name"] for e in worker["containers"][0]["env"]}
    assert {v["secret"]["secretName"] for v in worker["volumes"]} == {"modelsign-vault"}
    # Off until the operator turns it on: the base kustomization builds without Vault files.
    assert "components" not in kustomization()
