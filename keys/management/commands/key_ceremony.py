"""Key ceremonies from a runbook: open, confirm, abort, list.

Each custodian runs `confirm` as themselves with a code from their own authenticator:
  manage.py key_ceremony open --authority staging --user kim --otp 123456
  manage.py key_ceremony confirm CEREMONY_ID --user lee --otp 654321
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from keys import ceremonies
from keys.models import KeyCeremony
from signing_service.signing import SigningRefused


def _verified_user(username: str, code: str) -> tuple[Any, Any]:
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise CommandError(f"no active user {username!r}")
    for device in TOTPDevice.objects.filter(user=user, confirmed=True):
        if device.verify_is_allowed()[0] and device.verify_token(code.strip()):
            return user, timezone.now()
    raise CommandError(
        f"the authenticator code for {username!r} is not valid (or was already used)"
    )


class Command(BaseCommand):
    help = "Run a key ceremony: open, confirm, abort or list (each custodian with their own code)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        opening = sub.add_parser("open", help="open a ceremony to create a new key")
        opening.add_argument("--authority", required=True)
        opening.add_argument("--note", default="")
        opening.add_argument("--purpose", choices=["create", "destroy"], default="create")
        opening.add_argument("--key", help="with --purpose destroy: the key's id or hint prefix")
        for name in ("confirm", "abort"):
            p = sub.add_parser(name)
            p.add_argument("ceremony")
            if name == "abort":
                p.add_argument("--reason", default="")
        for p in (opening, sub.choices["confirm"], sub.choices["abort"]):
            p.add_argument("--user", required=True, help="the custodian acting")
            p.add_argument(
                "--otp", required=p is not sub.choices["abort"], help="their authenticator code"
            )
        sub.add_parser("list", help="open and recent ceremonies")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            getattr(self, f"_{opts['action']}")(opts)
        except SigningRefused as exc:
            raise CommandError(exc.message) from None

    def _open(self, opts: dict[str, Any]) -> None:
        user, verified = _verified_user(opts["user"], opts["otp"])
        key = None
        if opts["purpose"] == "destroy":
            from keys.certificates import CertificateError, resolve_key

            if not opts["key"]:
                raise CommandError("--purpose destroy needs --key")
            try:
                key = resolve_key(opts["key"])
            except CertificateError as exc:
                raise CommandError(str(exc)) from None
        c = ceremonies.open_ceremony(
            opts["authority"], user, otp_verified_at=verified, note=opts["note"],
            purpose=opts["purpose"], key=key,
        )  # fmt: skip
        self.stdout.write(
            f"opened {c.purpose} ceremony {c.pk} for {c.authority}: 1 of {c.quorum} custodians, "
            f"expires {c.expires_at:%Y-%m-%d %H:%M} UTC"
        )

    def _confirm(self, opts: dict[str, Any]) -> None:
        user, verified = _verified_user(opts["user"], opts["otp"])
        c = ceremonies.confirm(opts["ceremony"], user, otp_verified_at=verified)
        if c.key is not None:
            self.stdout.write(
                f"ceremony {c.pk} completed: new active key {c.key.fingerprint} for {c.authority}"
            )
        else:
            self.stdout.write(
                f"ceremony {c.pk}: {c.confirmations.count()} of {c.quorum} custodians"
            )

    def _abort(self, opts: dict[str, Any]) -> None:
        user = get_user_model().objects.filter(username=opts["user"]).first()
        c = ceremonies.abort(opts["ceremony"], user, opts["reason"])
        self.stdout.write(f"ceremony {c.pk} aborted")

    def _list(self, opts: dict[str, Any]) -> None:
        for c in KeyCeremony.objects.all()[:20]:
            self.stdout.write(f"{c.pk} {c.authority:12} {c.state:9} {c.confirmations.count()}/{c.quorum} "
                              f"opened {c.opened_at:%Y-%m-%d %H:%M} by {c.opened_by or 'the rotation job'}")  # fmt: skip
