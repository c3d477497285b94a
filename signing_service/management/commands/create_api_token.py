from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from signing_service import audit
from signing_service.models import ApiToken
from signing_service.policy import current_policy


class Command(BaseCommand):
    help = "Create an API token for a CI service identity; the token is printed once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("identity", help="service identity, e.g. ml-platform-ci@company.com")
        parser.add_argument(
            "--authority", action="append", required=True, dest="authorities",
            help="authority the token may sign for (repeat for several)",
        )  # fmt: skip
        parser.add_argument(
            "--expires-days", type=int, default=settings.API_TOKEN_DEFAULT_DAYS,
            help="days until the token expires (default %(default)s, at most 3650)",
        )  # fmt: skip
        parser.add_argument("--description", default="", help="what the token is for")

    def handle(self, *args: Any, **opts: Any) -> None:
        identity: str = opts["identity"]
        days: int = opts["expires_days"]
        if not 1 <= days <= 3650:
            raise CommandError("--expires-days must be between 1 and 3650")
        policy = current_policy()
        for name in opts["authorities"]:
            authority = policy.authority(name)
            if authority is None:
                raise CommandError(
                    f"unknown authority {name!r}; the policy has: {', '.join(policy.authorities)}"
                )
            if not authority.allows_signer(identity):
                raise CommandError(
                    f"{identity!r} is not an authorized signer for {name!r} "
                    f"(authorized_signers: {', '.join(authority.authorized_signers)})"
                )
        expires = timezone.now() + timedelta(days=days)
        with transaction.atomic():
            row, token = ApiToken.issue(identity, opts["authorities"], expires, opts["description"])
            audit.record(
                "manage.py",
                "api_token.created",
                target=row,
                data={"token": row.token_id, "identity": identity, "authorities": row.authorities,
                      "expires_at": expires.isoformat()},
            )  # fmt: skip
        self.stderr.write(
            f"Token {row.token_id} for {identity}, authorities {', '.join(row.authorities)}, "
            f"expires {expires:%Y-%m-%d}. It is shown once; store it as a CI secret."
        )
        self.stdout.write(token)
