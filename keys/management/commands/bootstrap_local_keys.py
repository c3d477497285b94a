"""Create the embedded default's SoftHSM tokens, one active key per HSM authority, and the
audit checkpoint key on a token of its own.

This is for a developer machine and CI only: it makes tokens with random PINs under
VAR_DIR and activates keys with no ceremony. It refuses to run in production, where keys
are created by a two-person key ceremony.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys import softhsm
from keys.lifecycle import register_key
from keys.models import SigningKey
from keys.registry import pkcs11_backend, pkcs11_token_label
from signing_service import audit_checkpoints
from signing_service.policy import CHECKPOINT_AUTHORITY, current_policy


def _secret_file(path: Path) -> str:
    """Read a PIN file, creating it with a random PIN (mode 0600) the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(8) + "\n")
    return path.read_text().strip()


class Command(BaseCommand):
    help = (
        "LOCAL/CI ONLY: create SoftHSM tokens, an active key for each HSM authority and the "
        "audit checkpoint key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--authority", action="append", dest="authorities",
                            help="only these authorities (default: every HSM authority)")  # fmt: skip

    def handle(self, *args: Any, **opts: Any) -> None:
        if settings.PRODUCTION:
            raise CommandError("bootstrap_local_keys refuses to run with MODELSIGN_ENV=production; "
                               "create production keys with a key ceremony")  # fmt: skip
        policy = current_policy()
        names = opts["authorities"] or [
            a.name for a in policy.authorities.values() if a.backend == "pkcs11"
        ]
        conf = self._prepare_softhsm()
        for name in names:
            authority = policy.authority(name)
            if authority is None or authority.backend != "pkcs11":
                raise CommandError(f"{name!r} is not an HSM authority in the policy")
            self._ensure_key(name, authority.key_algorithm, authority.key_rotation, conf)
        if not opts["authorities"]:
            self._ensure_checkpoint_key(conf)

    def _prepare_softhsm(self) -> Path:
        directory = Path(settings.SOFTHSM_DIR)
        conf = Path(softhsm.write_conf(directory))
        os.environ["SOFTHSM2_CONF"] = str(conf)
        self.user_pin = _secret_file(Path(settings.PKCS11_PIN_FILE))
        self.so_pin = _secret_file(directory / "so.pin")
        return conf

    def _ensure_key(self, authority: str, algorithm: str, validity: Any, conf: Path) -> None:
        existing = SigningKey.objects.active_for(authority)
        if existing is not None:
            self.stdout.write(f"{authority}: active key {existing.fingerprint} already exists")
            return
        label = pkcs11_token_label(authority)
        softhsm.init_token(str(conf), label, self.so_pin, self.user_pin)
        backend = pkcs11_backend(authority, label)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        generated = backend.generate(f"{authority}-{stamp}", algorithm)
        key = register_key(
            authority, backend, generated, algorithm=algorithm, validity=validity,
            actor="bootstrap_local_keys", activate=True,
            transcript={"ceremony": "none (local bootstrap)", "token": label},
        )  # fmt: skip
        self.stdout.write(f"{authority}: created active key {key.fingerprint} on token {label!r}")

    def _ensure_checkpoint_key(self, conf: Path) -> None:
        """The audit checkpoint key, on a token of its own with a PIN of its own."""
        existing = SigningKey.objects.active_for(CHECKPOINT_AUTHORITY)
        if existing is not None:
            self.stdout.write(
                f"audit checkpoints: active key {existing.fingerprint} already exists"
            )
            return
        label = settings.AUDIT_CHECKPOINT_TOKEN
        pin = _secret_file(Path(settings.AUDIT_CHECKPOINT_PIN_FILE))
        softhsm.init_token(str(conf), label, self.so_pin, pin)
        key = audit_checkpoints.create_key(
            "bootstrap_local_keys", transcript={"ceremony": "none (local bootstrap)"}
        )
        self.stdout.write(
            f"audit checkpoints: created active key {key.fingerprint} on token {label!r}"
        )
