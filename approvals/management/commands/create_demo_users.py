"""LOCAL ONLY: demo approvers so a newcomer can try the approval flow in the browser."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from approvals.groups import approver_group, custodian_group
from signing_service.policy import current_policy

# username, email, role: approvers approve production; custodians hold the key ceremonies.
DEMO_USERS = [
    ("alice", "alice@company.com", "approver"),
    ("bob", "bob@company.com", "approver"),
    ("kim", "kim@company.com", "custodian"),
    ("lee", "lee@company.com", "custodian"),
    ("carol", "carol@company.com", "none"),  # in no group: sees nothing
]


class Command(BaseCommand):
    help = "LOCAL ONLY: demo approvers alice and bob, custodians kim and lee, and carol (no role)."

    def handle(self, *args: Any, **opts: Any) -> None:
        if settings.PRODUCTION:
            raise CommandError("create_demo_users refuses to run with MODELSIGN_ENV=production")
        logins = Path(settings.VAR_DIR) / "demo-logins.txt"
        known = (
            dict(line.split(" ", 1) for line in logins.read_text().splitlines())
            if logins.exists()
            else {}
        )
        policy = current_policy()
        groups = {
            "approver": [
                Group.objects.get_or_create(name=approver_group(a.name))[0]
                for a in policy.authorities.values()
                if a.requires_approval
            ],
            "custodian": [
                Group.objects.get_or_create(name=custodian_group(a.name))[0]
                for a in policy.authorities.values()
                if a.backend in ("pkcs11", "vault")
            ],
            "none": [],
        }
        for username, email, role in DEMO_USERS:
            known[username] = self._ensure(username, email, known.get(username), groups[role])
        logins.write_text("".join(f"{u} {p}\n" for u, p in known.items()))
        logins.chmod(0o600)
        for username, _, role in DEMO_USERS:
            self.stdout.write(
                f"  {username:6} / {known[username]}   ({role if role != 'none' else 'no group'})"
            )

    def _ensure(self, username: str, email: str, password: str | None, groups: list[Group]) -> str:
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"email": email}
        )
        if created or password is None:
            password = secrets.token_urlsafe(9)
            user.set_password(password)
            user.save()
        user.groups.set(groups)
        return password
