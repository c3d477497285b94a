"""Revoke a key now: revoked + quarantine + incident in one transaction, then notifications.

manage.py revoke_key 7f3a9c --reason compromised --effective-at 2026-11-01T00:00:00Z
"""

from __future__ import annotations

import getpass
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from keys.certificates import CertificateError, resolve_key
from keys.lifecycle import KeyStateError
from keys.revocation import revoke

REASONS = ("compromised", "superseded", "ceased", "other")


def parse_time(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"--effective-at {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise CommandError("--effective-at needs a time zone, e.g. 2026-11-01T00:00:00Z")
    if when > timezone.now():
        raise CommandError(
            "--effective-at is in the future; revocation takes effect now or earlier"
        )
    return when


class Command(BaseCommand):
    help = "Revoke a signing key; quarantine what it signed at or after --effective-at."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="key id or hint prefix")
        parser.add_argument("--reason", choices=REASONS, required=True)
        parser.add_argument("--effective-at", help="ISO 8601 time (default: now)")
        parser.add_argument("--actor", default=f"manage.py:{getpass.getuser()}")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            key = resolve_key(opts["key"])
        except CertificateError as exc:
            raise CommandError(str(exc)) from None
        effective = parse_time(opts["effective_at"]) if opts["effective_at"] else None
        try:
            incident = revoke(
                key.pk, reason=opts["reason"], effective_at=effective, actor=opts["actor"]
            )
        except KeyStateError as exc:
            raise CommandError(f"cannot revoke {key}: {exc}") from None
        self.stdout.write(
            f"revoked {key.authority} key {key.fingerprint} effective {incident.effective_at.isoformat()}; "
            f"{incident.quarantined} signatures quarantined; incident {incident.pk}"
        )
        for note in incident.__class__.objects.get(pk=incident.pk).notifications:
            self.stdout.write(
                f"  notified {note['channel']} {note['to']}: {'ok' if note['ok'] else note['detail']}"
            )
