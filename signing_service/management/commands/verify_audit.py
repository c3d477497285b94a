from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from signing_service import audit_checkpoints as checkpoints
from signing_service.audit import verify_chain
from signing_service.bundle import BundleError


class Command(BaseCommand):
    help = (
        "Check the audit log's hash chain and every signed checkpoint; report the first "
        "edited, missing or removed entry and each checkpoint that fails, and why."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--checkpoint-key", action="append", default=[], metavar="PEM",
            help="verify checkpoints with this public key (PEM file) held outside the "
            "database instead of the key records in it; repeat for rotated keys",
        )  # fmt: skip
        parser.add_argument(
            "--checkpoint-file", action="append", default=[], metavar="JSON",
            help="also check a checkpoint envelope kept outside the database (as served by "
            "GET /api/v1/audit/checkpoints/) against the log; repeatable",
        )  # fmt: skip

    def handle(self, *args: Any, **opts: Any) -> None:
        trusted = _load_keys(opts["checkpoint_key"])
        problems: list[str] = []
        count, broken = verify_chain()
        if broken is not None:
            problems.append(f"audit log is BROKEN at entry {broken.seq}: {broken.message}")
        report = checkpoints.verify_checkpoints(trusted)
        problems += [f"checkpoint #{p.number} FAILS: {p.message}" for p in report.problems]
        problems += [_check_file(path, trusted) for path in opts["checkpoint_file"]]
        problems = [p for p in problems if p]
        if problems:
            raise CommandError("\n".join(problems))
        self.stdout.write(f"audit log OK: {count} entries, chain intact; {_summary(report)}")
        for path in opts["checkpoint_file"]:
            self.stdout.write(f"checkpoint file {path} OK")


def _load_keys(paths: list[str]) -> dict[str, Any] | None:
    if not paths:
        return None
    try:
        return checkpoints.trusted_keys([Path(p).read_bytes() for p in paths])
    except OSError as exc:
        raise CommandError(
            f"--checkpoint-key: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    except BundleError as exc:
        raise CommandError(f"--checkpoint-key: {exc}") from None


def _check_file(path: str, trusted: dict[str, Any] | None) -> str:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        return f"checkpoint file {path} FAILS: cannot read it: {exc.strerror}"
    try:
        checkpoints.verify_envelope(text, trusted)
    except checkpoints.CheckpointInvalid as exc:
        return f"checkpoint file {path} FAILS: {exc}"
    return ""


def _summary(report: checkpoints.CheckpointReport) -> str:
    if report.latest is None:
        return "no checkpoints yet"
    latest = report.latest
    return (
        f"{report.checked} checkpoint(s) verified, the newest #{latest.number} "
        f"signs entry {latest.seq} ({latest.created_at.isoformat()})"
    )
