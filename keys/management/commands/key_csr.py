"""Make a PKCS#10 CSR for an HSM or Vault key, signed inside the key's backend.

  manage.py key_csr 3 --subject "CN=modelsign staging signing key,O=Example" --out staging.csr

Send the CSR to the org CA; attach what it returns with ``manage.py key_certificate``.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys import certificates
from keys.backends.base import KeyBackendError

CA_REQUIREMENTS = (
    "Ask the CA for a leaf with: keyUsage digitalSignature (critical is fine) and "
    "extendedKeyUsage codeSigning, basicConstraints CA:FALSE, SHA-256 or stronger "
    "signatures; issued by CAs (basicConstraints CA:TRUE, keyCertSign) that are already "
    "valid when the leaf's validity starts (model_signing checks the chain at the leaf's "
    "notBefore) and that chain to a self-signed root verifiers pass with "
    "--certificate_chain. The CSR requests these extensions."
)


def default_actor() -> str:
    """Who ran the command, for the audit log (containers may have no passwd entry)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


class Command(BaseCommand):
    help = (
        "Write a CSR for a signing key (by id or unique hint prefix), signed by the key in "
        "its HSM or Vault. " + CA_REQUIREMENTS
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="key id or a unique prefix of its hint")
        parser.add_argument(
            "--subject",
            help="RFC 4514 subject, e.g. 'CN=...,O=...' "
            f"(default: {certificates.DEFAULT_SUBJECT.format(authority='<authority>')!r})",
        )
        parser.add_argument("--out", type=Path, help="write the PEM CSR here (default: stdout)")
        parser.add_argument("--actor", default=default_actor(), help="for the audit log")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            key = certificates.resolve_key(opts["key"])
            csr = certificates.build_csr(key, opts["subject"])
        except (certificates.CertificateError, KeyBackendError) as exc:
            raise CommandError(str(exc)) from None
        certificates.audit_csr(key, csr, actor=opts["actor"])
        pem = certificates.csr_pem(csr)
        if opts["out"] is None:
            self.stdout.write(pem.decode("ascii"), ending="")
            return
        opts["out"].write_bytes(pem)
        self.stderr.write(
            f"CSR for {key} ({csr.subject.rfc4514_string()}) written to {opts['out']}"
        )
