"""The append-only, hash-chained audit log.

Each entry's hash covers its own fields and the previous entry's hash, so editing, removing
or reordering any entry breaks the chain from that point on. The head row records the last
sequence number and hash, so removing entries from the end is detected too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from signing_service import rows
from signing_service.models import AuditEntry, AuditHead

GENESIS = "0" * 64


def entry_hash(
    *,
    seq: int,
    created_at: str,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    data: Any,
    prev_hash: str,
) -> str:
    body = {
        "seq": seq,
        "created_at": created_at,
        "actor": actor,
        "action": action,
        "target_type": target_type,
        "target_id": target_id,
        "data": data,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record(
    actor: str, action: str, *, target: Any = None, data: dict[str, Any] | None = None
) -> AuditEntry:
    """Append an entry. Must run inside the transaction that makes the change it records."""
    return record_each([(actor, action, target, data)])[0]


def record_each(
    entries: Iterable[tuple[str, str, Any, dict[str, Any] | None]],
) -> list[AuditEntry]:
    """Append ``(actor, action, target, data)`` entries, in order: what :func:`record` does for
    each, under one lock of the head, stored with one INSERT and one head update.

    The entries chain exactly as if recorded one by one; same transaction rule as ``record``.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise RuntimeError("audit records must be appended inside the transaction they record")
    # The head row lock makes concurrent appenders take turns, so seq has no gaps or forks.
    seq, prev = _lock_head(connection)
    now, chained = timezone.now(), []
    for actor, action, target, data in entries:
        chained.append(_chained(seq + 1, now, actor, action, target, data, prev))
        seq, prev = chained[-1].seq, chained[-1].entry_hash
    if chained:
        rows.insert(chained)
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {_head(connection)} SET seq = %s, entry_hash = %s WHERE id = 1",  # noqa: S608
                [seq, prev],
            )
    return chained


def _head(connection: Any) -> str:
    # Statements on the head are written out (signing_service.rows says why): every
    # signature appends here.
    return str(connection.ops.quote_name(AuditHead._meta.db_table))


def _lock_head(connection: Any) -> tuple[int, str]:
    """(seq, hash) of the head, locked until the transaction ends (SQLite: the BEGIN
    IMMEDIATE write lock already serialises writers)."""
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT seq, entry_hash FROM {_head(connection)} WHERE id = 1{lock}")  # noqa: S608
        row = cursor.fetchone()
    if row is None:  # the migration makes the row, but a flushed test database has none
        head, _ = AuditHead.objects.select_for_update().get_or_create(pk=1)
        return head.seq, head.entry_hash
    return int(row[0]), str(row[1])


def record_many(
    actor: str, action: str, items: Iterable[tuple[Any, dict[str, Any]]]
) -> list[AuditEntry]:
    """:func:`record_each` for one actor and action: one entry per ``(target, data)``."""
    return record_each((actor, action, target, data) for target, data in items)


def _chained(
    seq: int,
    now: datetime,
    actor: str,
    action: str,
    target: Any,
    data: dict[str, Any] | None,
    prev_hash: str,
) -> AuditEntry:
    """The unsaved entry ``seq`` after the entry whose hash is ``prev_hash``."""
    fields = {
        "seq": seq,
        "created_at": now.isoformat(),
        "actor": actor,
        "action": action,
        "target_type": type(target).__name__ if target is not None else "",
        "target_id": str(target.pk) if target is not None else "",
        "data": json.loads(json.dumps(data or {}, default=str)),
        "prev_hash": prev_hash,
    }
    digest = entry_hash(**fields)
    fields["created_at"] = now
    return rows.new(AuditEntry, entry_hash=digest, **fields)


@dataclass(frozen=True)
class AuditProblem:
    seq: int
    message: str


def verify_chain(batch_size: int = 2000) -> tuple[int, AuditProblem | None]:
    """Walk the whole chain; return (entries checked, first problem or None)."""
    expected_seq, prev = 1, GENESIS
    for entry in _iterate(batch_size):
        if entry.seq != expected_seq:
            return expected_seq - 1, AuditProblem(
                expected_seq, f"entry {expected_seq} is missing (next entry is {entry.seq})"
            )
        if entry.prev_hash != prev:
            return expected_seq - 1, AuditProblem(
                entry.seq, f"entry {entry.seq} does not link to entry {entry.seq - 1}"
            )
        if recompute_hash(entry) != entry.entry_hash:
            return expected_seq - 1, AuditProblem(
                entry.seq, f"entry {entry.seq} was modified (its hash does not match its contents)"
            )
        prev, expected_seq = entry.entry_hash, expected_seq + 1
    return expected_seq - 1, _check_head(expected_seq - 1, prev)


def _check_head(last_seq: int, last_hash: str) -> AuditProblem | None:
    head = AuditHead.objects.filter(pk=1).first() or AuditHead(seq=0, entry_hash=GENESIS)
    if head.seq != last_seq:
        return AuditProblem(
            last_seq + 1,
            f"the log ends at entry {last_seq} but its head records {head.seq} entries "
            "(entries were removed from the end)",
        )
    if head.entry_hash != last_hash:
        return AuditProblem(last_seq, f"entry {last_seq} does not match the recorded head hash")
    return None


def recompute_hash(entry: AuditEntry) -> str:
    """The hash ``entry`` should have, from its stored contents."""
    return entry_hash(
        seq=entry.seq,
        created_at=entry.created_at.isoformat(),
        actor=entry.actor,
        action=entry.action,
        target_type=entry.target_type,
        target_id=entry.target_id,
        data=entry.data,
        prev_hash=entry.prev_hash,
    )


def _iterate(batch_size: int) -> Iterator[AuditEntry]:
    last = 0
    while True:
        batch = list(AuditEntry.objects.filter(seq__gt=last).order_by("seq")[:batch_size])
        if not batch:
            return
        yield from batch
        last = batch[-1].seq
