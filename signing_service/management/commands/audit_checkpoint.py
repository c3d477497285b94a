from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.backends.base import KeyBackendError
from signing_service import audit_checkpoints as checkpoints


class Command(BaseCommand):
    help = (
        "Sign the audit log's head with the audit checkpoint key now (nothing is signed if the "
        "head did not move since the last checkpoint); or create, rotate or show that key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        action = parser.add_mutually_exclusive_group()
        action.add_argument(
            "--create-key", action="store_true",
            help="generate the checkpoint key on its own token (AUDIT_CHECKPOINT_TOKEN) and "
            "activate it; prints its public key for the auditors to keep",
        )  # fmt: skip
        action.add_argument(
            "--rotate", action="store_true",
            help="like --create-key, and move the current checkpoint key to transition",
        )  # fmt: skip
        action.add_argument(
            "--public-key", action="store_true",
            help="print the active checkpoint key's public key (PEM)",
        )  # fmt: skip
        parser.add_argument("--actor", default="manage.py audit_checkpoint",
                            help="who is acting, for the audit log")  # fmt: skip

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            if opts["create_key"] or opts["rotate"]:
                self._create_key(opts["actor"], rotate=opts["rotate"])
            elif opts["public_key"]:
                self.stdout.write(checkpoints.checkpoint_key().public_key_pem, ending="")
            else:
                self._checkpoint(opts["actor"])
        except (checkpoints.CheckpointError, KeyBackendError) as exc:
            raise CommandError(str(exc)) from None

    def _create_key(self, actor: str, *, rotate: bool) -> None:
        key = checkpoints.create_key(actor, rotate=rotate)
        self.stdout.write(
            f"audit checkpoint key {key.fingerprint} is active on token "
            f"{key.key_ref['token']!r}. Give its public key to the auditors:\n"
        )
        self.stdout.write(key.public_key_pem, ending="")

    def _checkpoint(self, actor: str) -> None:
        made = checkpoints.create_checkpoint(actor)
        if made is None:
            self.stdout.write("no new checkpoint: the audit log's head is already checkpointed")
            return
        self.stdout.write(
            f"checkpoint #{made.number} signs entry {made.seq} "
            f"(hash {made.entry_hash}) with key {made.key.fingerprint}"
        )
