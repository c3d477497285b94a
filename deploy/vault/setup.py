"""Prepare Vault for the signing service: transit mount, key, policy and AppRole.

Run by a Vault administrator (their token in a file), once and again whenever you like
(idempotent); a new AppRole secret_id is issued each run:

  python deploy/vault/setup.py --addr https://vault.example.com:8200 \\
      --admin-token-file ~/.vault-admin-token --key modelsign-staging \\
      --secret-id-out secrets/vault_secret_id

It enables the transit engine at --mount if needed, creates the key (ecdsa-p256,
exportable=false, allow_plaintext_backup=false; an existing key must already be so), writes
the policy deploy/vault/modelsign-policy.hcl for that mount and key (sign, verify, read:
nothing else), enables AppRole if needed and creates the role with only that policy. It
prints the settings the service needs: VAULT_ADDR, VAULT_TRANSIT_MOUNT, VAULT_ROLE_ID and
VAULT_SECRET_ID_FILE (the secret_id is written to --secret-id-out, mode 0600, never printed).
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
#: The mount and key names the policy file is written for; setup substitutes yours.
POLICY_MOUNT, POLICY_KEY = "transit", "modelsign-staging"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class SetupError(RuntimeError):
    """Something the administrator must fix; the message never holds a token or secret_id."""


def render_policy(mount: str, key: str) -> str:
    text = POLICY_FILE.read_text()
    for kind in ("sign", "verify", "keys"):
        text = text.replace(
            f'path "{POLICY_MOUNT}/{kind}/{POLICY_KEY}"', f'path "{mount}/{kind}/{key}"'
        )
    return text


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
    # Short-lived service tokens that carry only the signing policy.
    lifetimes = {"token_type": "service", "token_ttl": "1h", "token_max_ttl": "4h"}
    client.auth.approle.create_or_update_approle(role, token_policies=[policy], **lifetimes)
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
    key, role, policy = (_name(v, w) for v, w in ((args.key, "--key"), (args.role, "--role"),
                                                     (args.policy_name, "--policy-name")))  # fmt: skip
    try:
        token = Path(args.admin_token_file).read_text().strip()
    except OSError as exc:
        raise SetupError(f"--admin-token-file: {exc}") from None
    client = hvac.Client(url=args.addr, token=token, verify=args.cacert or True, timeout=15)
    lines = [ensure_transit(client, mount), ensure_key(client, mount, key)]
    client.sys.create_or_update_policy(name=policy, policy=render_policy(mount, key))
    lines.append(f"policy {policy!r}: sign and verify with {mount}/{key}, read its public keys")
    role_id = ensure_approle(client, role, policy)
    write_secret_id(client, role, Path(args.secret_id_out))
    lines.append(
        f"AppRole {role!r} with policy {policy!r}; a new secret_id is in {args.secret_id_out}"
    )
    lines += [
        "", "The service's settings:", f"VAULT_ADDR={args.addr}", f"VAULT_TRANSIT_MOUNT={mount}",
        f"VAULT_ROLE_ID={role_id}", f"VAULT_SECRET_ID_FILE=<where {args.secret_id_out} is mounted>",
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
    parser.add_argument("--key", default=POLICY_KEY, help="the transit key's name")
    parser.add_argument("--policy-name", default="modelsign")
    parser.add_argument("--role", default="modelsign", help="the AppRole role's name")
    parser.add_argument("--secret-id-out", required=True, help="file to write the new secret_id to")
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
