"""Create the SoftHSM2 tokens a signing policy needs; check the PINs of those that exist.

Run through ``deploy/softhsm/setup.sh`` (the container entrypoint's ``init-softhsm`` role).
Idempotent: a token that exists is left alone, but its user PIN file must open it, so a
wrong or swapped PIN file stops the deployment here and not at the first signature.

Tokens: one per HSM authority of ``SIGNING_POLICY_FILE`` (label ``PKCS11_TOKEN_<AUTHORITY>``,
default ``modelsign-<authority>``; user PIN ``PKCS11_PIN_FILE_<AUTHORITY>``, else
``PKCS11_PIN_FILE``) and the audit checkpoint token (``AUDIT_CHECKPOINT_TOKEN``, PIN
``AUDIT_CHECKPOINT_PIN_FILE``). New tokens get the security officer PIN from
``SOFTHSM_SO_PIN_FILE``. The configuration is ``SOFTHSM2_CONF`` when set, else
``SOFTHSM_DIR/softhsm2.conf`` (written if missing, tokens in ``SOFTHSM_DIR/tokens``), which
is where the service looks for it. PINs are read from files and typed into
``softhsm2-util`` through a terminal (keys/softhsm.py): never on a command line, never printed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SetupError(RuntimeError):
    """A problem the operator must fix; the message names it (never a PIN)."""


@dataclass(frozen=True)
class Token:
    label: str
    pin_file: Path
    purpose: str


def _env_suffix(authority: str) -> str:  # as keys.registry names the per-authority variables
    return "".join(ch if ch.isalnum() else "_" for ch in authority).upper()


def _required_path(name: str) -> Path:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SetupError(f"{name} must be set (a file holding the PIN)")
    return Path(value)


def wanted_tokens() -> list[Token]:
    from signing_service.policy import PolicyError, load_policy

    policy_file = os.environ.get("SIGNING_POLICY_FILE", "").strip()
    if not policy_file:
        raise SetupError("SIGNING_POLICY_FILE must be set (the policy naming the authorities)")
    try:
        policy = load_policy(Path(policy_file))
    except (OSError, PolicyError) as exc:
        raise SetupError(f"SIGNING_POLICY_FILE {policy_file}: {exc}") from None
    tokens = []
    for authority in policy.authorities.values():
        if authority.backend != "pkcs11":
            continue
        suffix = _env_suffix(authority.name)
        label = os.environ.get(f"PKCS11_TOKEN_{suffix}") or f"modelsign-{authority.name}"
        pin = os.environ.get(f"PKCS11_PIN_FILE_{suffix}") or _required_path("PKCS11_PIN_FILE")
        tokens.append(Token(label, Path(pin), f"authority {authority.name}"))
    tokens.append(
        Token(
            os.environ.get("AUDIT_CHECKPOINT_TOKEN") or "modelsign-audit-checkpoint",
            _required_path("AUDIT_CHECKPOINT_PIN_FILE"),
            "audit checkpoints",
        )
    )
    return _deduplicated(tokens)


def _deduplicated(tokens: list[Token]) -> list[Token]:
    seen: dict[str, Token] = {}
    for token in tokens:
        other = seen.setdefault(token.label, token)
        if other.pin_file != token.pin_file:
            raise SetupError(
                f"token {token.label!r} is named for {other.purpose} with PIN file "
                f"{other.pin_file} and for {token.purpose} with {token.pin_file}: one token, one PIN"
            )
    return list(seen.values())


def _conf() -> Path:
    from keys import softhsm

    explicit = os.environ.get("SOFTHSM2_CONF", "").strip()
    if explicit:
        if not Path(explicit).is_file():
            raise SetupError(f"SOFTHSM2_CONF {explicit} does not exist")
        return Path(explicit)
    directory = os.environ.get("SOFTHSM_DIR", "").strip()
    if not directory:
        raise SetupError("set SOFTHSM_DIR (the token directory) or SOFTHSM2_CONF")
    conf = Path(directory) / "softhsm2.conf"
    if not conf.exists():
        softhsm.write_conf(directory)
    return conf


def _pin(path: Path, what: str) -> str:
    from keys.backends.base import KeyBackendError
    from keys.backends.pkcs11 import read_pin_file

    try:
        return read_pin_file(path)
    except KeyBackendError as exc:
        raise SetupError(f"{what}: {exc}") from None


def _check_logins(module: str, tokens: list[Token]) -> None:
    """Log in to each token with its PIN file, in a fresh process.

    SoftHSM reads its token directory when the library is initialised, so a process that
    loaded it before ``softhsm2-util`` created a token does not see that token.
    """
    request = {
        "module": module,
        "tokens": [
            {"label": t.label, "pin_file": str(t.pin_file), "purpose": t.purpose} for t in tokens
        ],
    }
    done = subprocess.run(
        [sys.executable, __file__, "--check-logins"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["the login check failed"]
        raise SetupError(last[0].removeprefix("init-softhsm: "))


def _check_logins_here(request: dict[str, Any]) -> None:
    import pkcs11
    from pkcs11 import exceptions as px

    logging.disable(logging.WARNING)  # the parent already warned about the PIN files
    lib = pkcs11.lib(request["module"])
    for t in request["tokens"]:
        pin = _pin(Path(t["pin_file"]), f"user PIN for {t['label']!r}")
        try:
            with lib.get_token(token_label=t["label"]).open(user_pin=pin):
                pass
        except px.PinIncorrect:
            raise SetupError(
                f"the PIN in {t['pin_file']} does not open token {t['label']!r} ({t['purpose']}); "
                "fix the PIN file"
            ) from None
        except px.PKCS11Error as exc:
            raise SetupError(f"token {t['label']!r}: login failed ({type(exc).__name__})") from None


def run() -> list[str]:
    from keys import softhsm

    tokens = wanted_tokens()
    conf = _conf()
    # The library reads its configuration when loaded: set it before the first login check.
    os.environ["SOFTHSM2_CONF"] = str(conf.resolve())
    module = os.environ.get("PKCS11_MODULE") or softhsm.SOFTHSM_MODULE
    pins = {t.label: _pin(t.pin_file, f"user PIN for {t.label!r}") for t in tokens}
    existing = set(softhsm.list_tokens(conf))
    # Every existing token's PIN first: a wrong one stops the run before anything changes.
    _check_logins(module, [t for t in tokens if t.label in existing])
    so_pin = None
    lines = []
    for token in tokens:
        if token.label in existing:
            lines.append(f"token {token.label!r} ({token.purpose}): exists, PIN file opens it")
            continue
        if so_pin is None:
            so_pin = _pin(_required_path("SOFTHSM_SO_PIN_FILE"), "security officer PIN")
        try:
            softhsm.init_token(conf, token.label, so_pin, pins[token.label])
        except ValueError as exc:  # a label or PIN softhsm2-util would mangle
            raise SetupError(f"token {token.label!r}: {exc}") from None
        lines.append(f"token {token.label!r} ({token.purpose}): created")
    _check_logins(module, [t for t in tokens if t.label not in existing])
    return lines


def main() -> int:
    from keys.softhsm import SoftHSMError

    try:
        if sys.argv[1:] == ["--check-logins"]:
            _check_logins_here(json.loads(sys.stdin.read()))
            return 0
        lines = run()
    except (SetupError, SoftHSMError) as exc:
        print(f"init-softhsm: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"init-softhsm: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
