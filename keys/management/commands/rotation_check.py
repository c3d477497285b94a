"""What the rotation job sees, and (without --dry-run) one run of it now.

manage.py rotation_check --dry-run                      # what is due now; changes nothing
manage.py rotation_check --dry-run --at 2026-10-01T00:00Z   # what will be due then
manage.py rotation_check                                # do it now (what beat does hourly)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from keys import ceremonies, rotation
from keys.models import KeyState, SigningKey
from signing_service.policy import current_policy


def parse_at(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"--at {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise CommandError("--at needs a time zone, e.g. 2026-10-01T00:00:00Z")
    return when


class Command(BaseCommand):
    help = (
        "Show each key-based authority's rotation status and what is due; run it unless --dry-run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="only print what is due")
        parser.add_argument(
            "--at", help="with --dry-run: evaluate at this ISO 8601 time instead of now"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["at"] and not opts["dry_run"]:
            raise CommandError("--at only goes with --dry-run: the job acts at the current time")
        now = parse_at(opts["at"]) if opts["at"] else timezone.now()
        for line in status_lines(now):
            self.stdout.write(line)
        if opts["dry_run"]:
            items = rotation.due(now)
            self.stdout.write(f"due at {now:%Y-%m-%d %H:%M} UTC: {len(items) or 'nothing'}")
            for item in items:
                self.stdout.write(f"  {item.kind:26} {item.detail}")
            return
        report = rotation.run(now)
        done = [(kind, item) for kind, items in report.items() for item in items]
        self.stdout.write(f"done: {len(done) or 'nothing was due'}")
        for kind, item in done:
            self.stdout.write(f"  {kind:26} {item.get('error') or item['detail']}")
        if report["errors"]:
            raise CommandError(f"{len(report['errors'])} step(s) failed; see above and the log")


def status_lines(now: datetime) -> list[str]:
    policy = current_policy()
    lead = timedelta(days=policy.key_management.rotation_lead_days)
    window = timedelta(days=policy.key_management.transition_days)
    lines = []
    for name, authority in sorted(policy.authorities.items()):
        if authority.backend not in ceremonies.KEY_BACKENDS:
            continue
        keys = SigningKey.objects.filter(
            authority=name, state__in=(KeyState.ACTIVE, KeyState.TRANSITION)
        )
        active = [k for k in keys if k.state == KeyState.ACTIVE]
        if not active:
            lines.append(f"{name}: no active key; requests wait until a ceremony creates one")
        for key in active:
            lines.append(f"{name}: active key {key.fingerprint} {_expiry(key, lead, now)}")
        for key in keys:
            if key.state == KeyState.TRANSITION:
                entered = rotation.transition_started(key)
                until = f"{entered + window:%Y-%m-%d %H:%M} UTC" if entered else "unknown"
                lines.append(f"{name}: transition key {key.fingerprint} retires {until}")
    return lines


def _expiry(key: SigningKey, lead: timedelta, now: datetime) -> str:
    if key.not_after is None:
        return "never expires (no rotation)"
    when = f"{key.not_after:%Y-%m-%d %H:%M} UTC"
    if key.not_after <= now:
        return f"EXPIRED {when}: it signs nothing"
    opens = key.not_after - lead
    if opens <= now:
        return f"expires {when}: rotation due"
    return f"expires {when}; rotation opens {opens:%Y-%m-%d %H:%M} UTC"
