"""Attach the org CA's certificate chain to a signing key.

  manage.py key_certificate 3 --chain chain.pem

``chain.pem`` holds the leaf (issued from ``key_csr``'s CSR) first, then each issuer in
order; the self-signed root may follow and is checked but not stored (verifiers must bring
their own copy). From then on the key's bundles carry the chain instead of the key hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys import certificates
from keys.management.commands.key_csr import CA_REQUIREMENTS, default_actor


class Command(BaseCommand):
    help = (
        "Attach a CA certificate chain (PEM: leaf first, then intermediates, optionally the "
        "root) to a key given by id or unique hint prefix. " + CA_REQUIREMENTS
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="key id or a unique prefix of its hint")
        parser.add_argument("--chain", type=Path, required=True, help="PEM file, leaf first")
        parser.add_argument("--actor", default=default_actor(), help="for the audit log")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            pem = opts["chain"].read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {opts['chain']}: {exc.strerror}") from None
        try:
            key = certificates.resolve_key(opts["key"])
            checked = certificates.attach_chain(key, pem, actor=opts["actor"])
        except certificates.CertificateError as exc:
            raise CommandError(str(exc)) from None
        for warning in checked.warnings:
            self.stderr.write(f"warning: {warning}")
        summary = checked.summary()
        self.stdout.write(
            f"attached to {key}: {summary['subject']} issued by {summary['issuer']}, "
            f"valid until {summary['not_after']}; bundles now carry "
            f"{len(checked.stored)} certificate(s)"
        )
