"""LOCAL ONLY: demo approvers so a newcomer can try the approval flow in the browser."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from approvals.groups import approver_group
from signing_service.policy import current_policy

# username, email, approves for authorities that require approval?
DEMO_USERS = [
    ("alice", "alice@company.com", True),
    ("bob", "bob@company.com", True),
    ("carol", "carol@company.com", False),  # in no approver group: sees nothing
]


class Command(BaseCommand):
    help = "LOCAL ONLY: create demo users alice and bob (approvers) and carol (not an approver)."

    def handle(self, *args: Any, **opts: Any) -> None:
        if settings.PRODUCTION:
            raise CommandError("create_demo_users refuses to run with MODELSIGN_ENV=production")
        logins = Path(settings.VAR_DIR) / "demo-logins.txt"
        known = (
            dict(line.split(" ", 1) for line in logins.read_text().splitlines())
            if logins.exists()
            else {}
        )
        groups = [
            Group.objects.get_or_create(name=approver_group(a.name))[0]
            for a in current_policy().authorities.values()
            if a.requires_approval
        ]
        for username, email, approver in DEMO_USERS:
            known[username] = self._ensure(
                username, email, known.get(username), groups if approver else []
            )
        logins.write_text("".join(f"{u} {p}\n" for u, p in known.items()))
        logins.chmod(0o600)
        for username, _, approver in DEMO_USERS:
            role = "approver" if approver else "no approver group"
            self.stdout.write(f"  {username:6} / {known[username]}   ({role})")

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
