"""Create a person's login and give them roles: approver and/or key custodian of authorities.

In production nobody else creates users: there is no admin site. The password is read from a
file or generated and printed once; the person sets up their authenticator app at their
first login (/account/authenticator/), which approvals and key ceremonies need.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from approvals.groups import approver_group, custodian_group
from signing_service import audit
from signing_service.policy import current_policy


class Command(BaseCommand):
    help = "Create a user (or add roles to one): --approver AUTHORITY, --custodian AUTHORITY."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--email", required=True, help="their identity in the audit log")
        parser.add_argument("--approver", action="append", default=[], metavar="AUTHORITY",
                            help="may approve requests for this authority (repeatable)")  # fmt: skip
        parser.add_argument("--custodian", action="append", default=[], metavar="AUTHORITY",
                            help="key custodian of this authority (repeatable)")  # fmt: skip
        parser.add_argument("--password-file", type=Path,
                            help="read the password here; default: generate one, print it once")  # fmt: skip

    def handle(self, *args: Any, **opts: Any) -> None:
        groups = self._groups(opts["approver"], opts["custodian"])
        password = self._password(opts["password_file"])
        User = get_user_model()
        with transaction.atomic():
            user, created = User.objects.get_or_create(
                username=opts["username"], defaults={"email": opts["email"]}
            )
            if not created and user.email != opts["email"]:
                raise CommandError(
                    f"user {user.username!r} exists with email {user.email!r}, not {opts['email']!r}"
                )
            if created or opts["password_file"]:
                self._set_password(user, password or secrets.token_urlsafe(12))
            user.groups.add(*groups)
            audit.record(
                "manage.py", "user.created" if created else "user.roles_added", target=user,
                data={"username": user.username, "email": user.email,
                      "groups": sorted(g.name for g in groups)},
            )  # fmt: skip
        roles = ", ".join(sorted(g.name for g in groups)) or "no role"
        self.stderr.write(f"{'created' if created else 'updated'} {user.username} ({roles})")
        if created and not opts["password_file"]:
            self.stdout.write(self._generated)

    def _groups(self, approver: list[str], custodian: list[str]) -> list[Group]:
        policy = current_policy()
        for authority in approver + custodian:
            if policy.authority(authority) is None:
                raise CommandError(
                    f"unknown authority {authority!r}; the policy has: {', '.join(policy.authorities)}"
                )
        for authority in custodian:
            if policy.authorities[authority].backend not in ("pkcs11", "vault"):
                raise CommandError(f"{authority!r} is keyless: it has no keys to keep")
        names = [approver_group(a) for a in approver] + [custodian_group(a) for a in custodian]
        return [Group.objects.get_or_create(name=name)[0] for name in names]

    def _password(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            password = path.read_text().rstrip("\n")
        except OSError as exc:
            raise CommandError(f"--password-file: cannot read {path}: {exc}") from None
        if not password:
            raise CommandError(f"--password-file: {path} is empty")
        return password

    def _set_password(self, user: Any, password: str) -> None:
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError(f"password refused: {' '.join(exc.messages)}") from None
        user.set_password(password)
        user.save()
        self._generated = password
