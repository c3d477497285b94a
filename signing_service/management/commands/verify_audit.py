from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from signing_service.audit import verify_chain


class Command(BaseCommand):
    help = "Check the audit log's hash chain; report the first edited, missing or removed entry."

    def handle(self, *args: Any, **opts: Any) -> None:
        count, problem = verify_chain()
        if problem is not None:
            raise CommandError(f"audit log is BROKEN at entry {problem.seq}: {problem.message}")
        self.stdout.write(f"audit log OK: {count} entries, chain intact")
