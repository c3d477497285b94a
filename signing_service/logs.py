"""Structured logs: one JSON object per line, and a request id that follows a request.

The request id lives in a context variable. The request middleware
(:mod:`signing_service.observability`) sets it for the life of an HTTP request; Celery carries
it in the message headers of every task published meanwhile (``before_task_publish``) and the
worker restores it around the task (``task_prerun`` / ``task_postrun``), so the worker's log
lines for a request's signing task carry the id of the HTTP request that caused it.

``settings.LOGGING`` attaches :class:`RequestContextFilter` to the handler, so every record,
from any logger, has ``request_id`` (and ``task_id`` / ``task_name`` inside a task) before
either formatter sees it. Importing this module (the logging configuration does, in every
Django process: gunicorn workers, the Celery worker and beat) connects the Celery signals.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

from celery.signals import before_task_publish, task_postrun, task_prerun
from django.core.signals import request_finished
from django.dispatch import receiver

#: The id of the HTTP request (or of the request a task was published for), or None.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
#: The Celery task being run by this process, as (task id, task name), or None.
task_var: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "celery_task", default=None
)

#: Header carrying the id over HTTP, and its key in a Celery message's headers.
HTTP_HEADER = "X-Request-ID"
TASK_HEADER = "modelsign_request_id"

#: What an incoming X-Request-ID may look like (UUIDs, trace ids, base64 tokens); anything
#: else (too long, spaces, control characters) is replaced by a fresh id.
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(incoming: str | None) -> str:
    """The caller's id if it is sane, else a fresh one."""
    if incoming and _SANE.fullmatch(incoming):
        return incoming
    return new_request_id()


# --- logging ---------------------------------------------------------------------------

#: Attributes every LogRecord has; anything else on a record is an ``extra`` and is logged.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()
    | {"message", "asctime", "request_id", "task_id", "task_name", "taskName"}
)


class RequestContextFilter(logging.Filter):
    """Put the current request id (and Celery task) on every record; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        task = task_var.get()
        record.task_id, record.task_name = task if task else ("", "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _or_none(getattr(record, "request_id", None)),
        }
        task_id = getattr(record, "task_id", "")
        if task_id:
            entry["task_id"] = task_id
            entry["task_name"] = getattr(record, "task_name", "")
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRS and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


def _or_none(value: str | None) -> str | None:
    return None if value in (None, "-") else value


@receiver(request_finished, weak=False, dispatch_uid="modelsign-forget-request-id")
def _forget_request_id_after(**_: Any) -> None:
    """The request's answer is sent and logged: later lines of this thread are not its own."""
    request_id_var.set(None)


# --- Celery: the id travels in the task message's headers --------------------------------


@before_task_publish.connect(weak=False)
def _add_request_id(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = request_id_var.get()
    if request_id and headers is not None:
        headers[TASK_HEADER] = request_id


@task_prerun.connect(weak=False)
def _restore_request_id(task_id: str = "", task: Any = None, **_: Any) -> None:
    carried = _carried_request_id(task)
    # Set, never inherit: a pool process runs one task after another.
    request_id_var.set(accept_request_id(carried) if carried else None)
    task_var.set((task_id, getattr(task, "name", "")))


@task_postrun.connect(weak=False)
def _forget_request_id(**_: Any) -> None:
    request_id_var.set(None)
    task_var.set(None)


def _carried_request_id(task: Any) -> str | None:
    request = getattr(task, "request", None)
    if request is None:
        return None
    # Protocol 2 merges custom message headers into the task's request context.
    value = getattr(request, TASK_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(TASK_HEADER)
    return value if isinstance(value, str) else None
