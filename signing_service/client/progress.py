"""A tiny progress display for stderr: a byte bar and a waiting status line.

On a terminal both redraw one line in place (at most ten times a second). When stderr is
not a terminal (CI logs) they print a plain line now and then instead, so logs stay short
and readable. ``enabled=False`` (``--quiet``) turns them off entirely.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["ProgressBar", "StatusLine", "format_bytes", "format_duration"]

_TTY_INTERVAL = 0.1  # seconds between redraws on a terminal
_LOG_INTERVAL = 15.0  # seconds between plain lines in a log
_SPINNER = "|/-\\"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Line:
    """Shared terminal/log line handling for the two displays."""

    def __init__(
        self, stream: TextIO | None, enabled: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and _isatty(self.stream)
        self.clock = clock
        self.started = clock()
        # A log gets its first line only after an interval: short jobs print just a summary.
        self._last = float("-inf") if self.tty else self.started
        self._drawn = False
        self.lock = threading.Lock()

    def due(self, now: float) -> bool:
        return now - self._last >= (_TTY_INTERVAL if self.tty else _LOG_INTERVAL)

    def show(self, text: str, now: float) -> None:
        self._last = now
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, text: str | None) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
        if text:
            self.stream.write(text + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """Bytes done of a known total, with rate and ETA. :meth:`update` is thread-safe."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "hashing",
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.done = 0
        self._line = _Line(stream, enabled, clock)
        self._closed = False

    def update(self, delta: int) -> None:
        if not self._line.enabled:
            return
        with self._line.lock:
            self.done += delta
            now = self._line.clock()
            if not self._closed and self._line.due(now):
                self._line.show(self.render(now), now)

    def render(self, now: float) -> str:
        elapsed = max(now - self._line.started, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        text = (
            f"{self.label}: {frac * 100:5.1f}% {format_bytes(self.done)}/"
            f"{format_bytes(self.total)}  {rate / 1e6:.0f} MB/s  ETA {format_duration(eta)}"
        )
        if self._line.tty:  # last, so a narrow terminal cuts the bar, not the numbers
            filled = int(20 * min(frac, 1.0))
            text += f"  [{'#' * filled}{'.' * (20 - filled)}]"
        return text

    def close(self) -> None:
        """Erase the bar and print one summary line."""
        if not self._line.enabled or self._closed:
            return
        with self._line.lock:
            self._closed = True
            elapsed = max(self._line.clock() - self._line.started, 1e-9)
            self._line.finish(
                f"{self.label}: {format_bytes(self.done)} in {elapsed:.1f} s "
                f"({self.done / elapsed / 1e6:.0f} MB/s)"
            )

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._line.enabled:
            self._closed = True
            self._line.finish(None)


class StatusLine:
    """A spinner with a status text and elapsed time, for waiting on something.

    In a log it prints a line when the text changes, and otherwise every 15 s at most.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._line = _Line(stream, enabled, clock)
        self._text = ""
        self._frame = 0

    def update(self, text: str) -> None:
        if not self._line.enabled:
            return
        now = self._line.clock()
        changed = text != self._text
        self._text = text
        if not (changed or self._line.due(now)):
            return
        elapsed = format_duration(now - self._line.started)
        if self._line.tty:
            self._frame = (self._frame + 1) % len(_SPINNER)
            self._line.show(f"{_SPINNER[self._frame]} {text}  {elapsed}", now)
        else:
            self._line.show(f"{text} ({elapsed} elapsed)", now)

    def close(self, final: str | None = None) -> None:
        if self._line.enabled:
            self._line.finish(final)

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
