"""Prepare Vault for the signing service: transit mount, key, two policies and two AppRoles.

Run by a Vault administrator (their token in a file), once per authority on Vault and again
whenever you like (idempotent); new AppRole secret_ids are issued each run:

  python deploy/vault/setup.py --addr https://vault.example.com:8200 \\
      --admin-token-file ~/.vault-admin-token --authority staging \\
      --secret-id-out secrets/vault_secret_id \\
      --ceremony-secret-id-out secrets/vault_ceremony_secret_id

It enables the transit engine at --mount if needed and creates the authority's key
(--key, default modelsign-<authority>: ecdsa-p256, exportable=false,
allow_plaintext_backup=false; an existing key must already be so). The service never signs
with a version made here: its first key ceremony adopts the key by rotating it, at the
quorum. It writes two policies for that mount and key:

* deploy/vault/modelsign-policy.hcl as --policy-name (default modelsign-<authority>): sign,
  verify and read, nothing else; for the AppRole --role (default modelsign), which the web
  and the worker use;
* deploy/vault/modelsign-ceremony-policy.hcl as <policy-name>-ceremony: create the key
  (only ecdsa-p256, never exportable, never backed up in plaintext), rotate it, raise its
  min_encryption_version, read it; no signing; for the AppRole --ceremony-role (default
  modelsign-ceremony), which only the processes completing key ceremonies get.

Each role keeps the policies earlier runs gave it (one role serves every authority). It
prints the service's settings: VAULT_ADDR, VAULT_TRANSIT_MOUNT, VAULT_KEY_<AUTHORITY>,
VAULT_ROLE_ID, VAULT_SECRET_ID_FILE, VAULT_CEREMONY_ROLE_ID and VAULT_CEREMONY_SECRET_ID_FILE
(the secret_ids are written to --secret-id-out and --ceremony-secret-id-out, mode 0600,
never printed).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import hvac
from hvac import exceptions as hv

POLICY_FILE = Path(__file__).with_name("modelsign-policy.hcl")
CEREMONY_POLICY_FILE = Path(__file__).with_name("modelsign-ceremony-policy.hcl")
#: The mount and key names the policy files are written for; setup substitutes yours.
POLICY_MOUNT, POLICY_KEY = "transit", "modelsign-staging"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PATH_LINE = re.compile(
    rf'^path "{POLICY_MOUNT}/(sign|verify|keys)/{POLICY_KEY}((?:/rotate|/config)?)"', re.MULTILINE
)


class SetupError(RuntimeError):
    """Something the administrator must fix; the message never holds a token or secret_id."""


def render_policy(mount: str, key: str, source: Path = POLICY_FILE) -> str:
    """A policy file with ``mount`` and ``key`` in its paths (comments are left as they are)."""
    return _PATH_LINE.sub(
        lambda m: f'path "{mount}/{m.group(1)}/{key}{m.group(2)}"', source.read_text()
    )


def env_suffix(authority: str) -> str:
    """As keys/registry.py: VAULT_KEY_<this> names the authority's transit key."""
    return "".join(ch if ch.isalnum() else "_" for ch in authority).upper()


def _name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise SetupError(f"{what} {value!r}: letters, digits, '_', '.', '-' only")
    return value


def _data(answer: Any) -> dict[str, Any]:
    if isinstance(answer, dict):
        return answer.get("data") or answer
    return {}


def ensure_transit(client: hvac.Client, mount: str) -> str:
    mounts = _data(client.sys.list_mounted_secrets_engines())
    found = mounts.get(f"{mount}/")
    if found is None:
        client.sys.enable_secrets_engine("transit", path=mount)
        return f"enabled the transit engine at {mount}/"
    if found.get("type") != "transit":
        raise SetupError(f"{mount}/ is a {found.get('type')} mount, not transit")
    return f"transit engine at {mount}/: already enabled"


def ensure_key(client: hvac.Client, mount: str, key: str) -> str:
    try:
        existing = _data(client.secrets.transit.read_key(name=key, mount_point=mount))
    except hv.InvalidPath:
        existing = None
    if existing is None:
        client.secrets.transit.create_key(
            name=key, key_type="ecdsa-p256", exportable=False,
            allow_plaintext_backup=False, mount_point=mount,
        )  # fmt: skip
        return f"created transit key {key!r} (ecdsa-p256, not exportable, no plaintext backup)"
    problems = []
    if existing.get("type") != "ecdsa-p256":
        problems.append(f"type {existing.get('type')}, not ecdsa-p256")
    if existing.get("exportable"):
        problems.append("exportable")
    if existing.get("allow_plaintext_backup"):
        problems.append("plaintext backup allowed")
    if problems:
        raise SetupError(f"transit key {key!r} exists but is {', '.join(problems)}: not usable")
    return f"transit key {key!r}: exists (ecdsa-p256, not exportable, no plaintext backup)"


def ensure_approle(client: hvac.Client, role: str, policy: str) -> str:
    methods = _data(client.sys.list_auth_methods())
    if "approle/" not in methods:
        client.sys.enable_auth_method("approle")
    try:
        existing = _data(client.auth.approle.read_role(role)).get("token_policies") or []
    except hv.InvalidPath:
        existing = []
    # One role serves every authority: keep the policies earlier runs gave it.
    policies = [*existing, *([policy] if policy not in existing else [])]
    # Short-lived service tokens that carry only these policies.
    lifetimes = {"token_type": "service", "token_ttl": "1h", "token_max_ttl": "4h"}
    client.auth.approle.create_or_update_approle(role, token_policies=policies, **lifetimes)
    return str(client.auth.approle.read_role_id(role)["data"]["role_id"])


def write_secret_id(client: hvac.Client, role: str, out: Path) -> None:
    secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret_id + "\n")
    tmp.replace(out)


def run(args: argparse.Namespace) -> list[str]:
    mount = _name(args.mount, "--mount")
    authority = _name(args.authority, "--authority")
    key = _name(args.key or f"modelsign-{authority}", "--key")
    policy = _name(args.policy_name or f"modelsign-{authority}", "--policy-name")
    ceremony_policy = f"{policy}-ceremony"
    role, ceremony_role = _name(args.role, "--role"), _name(args.ceremony_role, "--ceremony-role")
    if role == ceremony_role:
        raise SetupError(
            "--role and --ceremony-role must differ: signing and ceremonies never share a credential"
        )
    outs = (Path(args.secret_id_out), Path(args.ceremony_secret_id_out))
    if outs[0].resolve() == outs[1].resolve():
        raise SetupError("--secret-id-out and --ceremony-secret-id-out must be different files")
    try:
        token = Path(args.admin_token_file).read_text().strip()
    except OSError as exc:
        raise SetupError(f"--admin-token-file: {exc}") from None
    client = hvac.Client(url=args.addr, token=token, verify=args.cacert or True, timeout=15)
    lines = [ensure_transit(client, mount), ensure_key(client, mount, key)]
    client.sys.create_or_update_policy(name=policy, policy=render_policy(mount, key))
    lines.append(f"policy {policy!r}: sign and verify with {mount}/{key}, read its public keys")
    client.sys.create_or_update_policy(
        name=ceremony_policy, policy=render_policy(mount, key, CEREMONY_POLICY_FILE)
    )
    lines.append(
        f"policy {ceremony_policy!r}: create {mount}/{key} (ecdsa-p256, not exportable, no "
        "plaintext backup), rotate it, raise its min_encryption_version, read it; no signing"
    )
    role_id = ensure_approle(client, role, policy)
    write_secret_id(client, role, outs[0])
    ceremony_role_id = ensure_approle(client, ceremony_role, ceremony_policy)
    write_secret_id(client, ceremony_role, outs[1])
    lines += [
        f"AppRole {role!r} with policy {policy!r}; a new secret_id is in {outs[0]}",
        f"AppRole {ceremony_role!r} with policy {ceremony_policy!r}; a new secret_id is in {outs[1]}",
        "", "The service's settings (web and worker):", f"VAULT_ADDR={args.addr}",
        f"VAULT_TRANSIT_MOUNT={mount}", f"VAULT_KEY_{env_suffix(authority)}={key}",
        f"VAULT_ROLE_ID={role_id}", f"VAULT_SECRET_ID_FILE=<where {outs[0]} is mounted>",
        "", "Only for the web and the key_ceremony runner (never the worker or beat):",
        f"VAULT_CEREMONY_ROLE_ID={ceremony_role_id}",
        f"VAULT_CEREMONY_SECRET_ID_FILE=<where {outs[1]} is mounted>",
        "", f"The first key ceremony for {authority!r} adopts {key!r} by rotating it at the quorum.",
    ]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--addr", default=os.environ.get("VAULT_ADDR"), required=not os.environ.get("VAULT_ADDR")
    )
    parser.add_argument(
        "--admin-token-file", required=True, help="a Vault token allowed to set all this up"
    )
    parser.add_argument("--mount", default="transit")
    parser.add_argument("--authority", default="staging", help="the policy file's authority")
    parser.add_argument("--key", help="the transit key's name (default modelsign-<authority>)")
    parser.add_argument(
        "--policy-name", help="the signing policy's name (default modelsign-<authority>)"
    )
    parser.add_argument("--role", default="modelsign", help="the signing AppRole's name")
    parser.add_argument(
        "--ceremony-role", default="modelsign-ceremony", help="the ceremonies' AppRole's name"
    )
    parser.add_argument(
        "--secret-id-out", required=True, help="file for the signing AppRole's new secret_id"
    )
    parser.add_argument(
        "--ceremony-secret-id-out",
        required=True,
        help="file for the ceremonies' AppRole's new secret_id",
    )
    parser.add_argument("--cacert", default=os.environ.get("VAULT_CACERT", ""))
    args = parser.parse_args(argv)
    try:
        lines = run(args)
    except SetupError as exc:
        print(f"vault setup: {exc}", file=sys.stderr)
        return 1
    except (hv.VaultError, OSError) as exc:
        print(
            f"vault setup: Vault refused or is unreachable: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
