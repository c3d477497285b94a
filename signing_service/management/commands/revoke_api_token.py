from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from signing_service import audit
from signing_service.models import ApiToken


class Command(BaseCommand):
    help = "Revoke an API token by its public id (the part after 'mst_', before '_')."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("token_id")

    def handle(self, *args: Any, **opts: Any) -> None:
        with transaction.atomic():
            row = ApiToken.objects.select_for_update().filter(token_id=opts["token_id"]).first()
            if row is None:
                raise CommandError(f"no API token with id {opts['token_id']!r}")
            if row.revoked_at is not None:
                raise CommandError(f"token {row.token_id} was already revoked at {row.revoked_at}")
            row.revoked_at = timezone.now()
            row.save(update_fields=["revoked_at"])
            audit.record("manage.py", "api_token.revoked", target=row, data={"token": row.token_id})
        self.stdout.write(f"revoked token {row.token_id} ({row.identity})")
