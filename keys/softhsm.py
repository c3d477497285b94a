"""SoftHSM2 helpers for the embedded default key store and for tests (SPEC section 6).

Everything here drives Debian's ``softhsm2-util`` in a subprocess, so this module never
loads the PKCS#11 library itself: a process that only prepares tokens (a management
command, a test fixture, the gunicorn master) stays fork-safe.

The library reads ``SOFTHSM2_CONF`` once, when it is initialised: callers that load the
module in-process (``Pkcs11Backend``) must set ``os.environ["SOFTHSM2_CONF"]`` before the
first PKCS#11 call. The helpers below pass the configuration to ``softhsm2-util``
explicitly and never depend on the caller's environment.

PINs are typed into ``softhsm2-util`` through a pseudo-terminal instead of ``--pin`` and
``--so-pin``, so they never appear in the process list (``/proc/PID/cmdline``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

#: Debian's module path; override with ``SOFTHSM_MODULE`` (e.g. another distribution).
SOFTHSM_MODULE: str = os.environ.get("SOFTHSM_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
#: The token tool; override with ``SOFTHSM2_UTIL``.
SOFTHSM2_UTIL: str = os.environ.get("SOFTHSM2_UTIL", "softhsm2-util")

_TIMEOUT_S = 60
#: CK_TOKEN_INFO.label is 32 bytes, blank padded: longer labels are cut, trailing blanks lost.
_MAX_LABEL_BYTES = 32
_LABEL_LINE = re.compile(r"^\s*Label:\s*(.*?)\s*$")
_INITIALIZED_LINE = re.compile(r"^\s*Initialized:\s*(\w+)\s*$")


class SoftHSMError(RuntimeError):
    """``softhsm2-util`` failed; the message carries its output (never a PIN)."""


def write_conf(directory: str | os.PathLike[str]) -> Path:
    """Write a private SoftHSM2 configuration under ``directory``; return its path.

    Tokens live in ``directory/tokens`` (file object store); the library logs errors only.
    Calling it again rewrites the file and keeps existing tokens.
    """
    base = Path(directory).resolve()
    tokendir = base / "tokens"
    tokendir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    conf.chmod(0o600)
    return conf


def list_tokens(conf_path: str | os.PathLike[str]) -> list[str]:
    """Labels of the initialised tokens of this configuration."""
    out = _run(conf_path, ["--show-slots"]).stdout
    labels: list[str] = []
    initialized = False
    for line in out.splitlines():
        if m := _INITIALIZED_LINE.match(line):
            initialized = m.group(1) == "yes"
        elif (m := _LABEL_LINE.match(line)) and initialized:
            labels.append(m.group(1))
    return labels


def token_exists(conf_path: str | os.PathLike[str], label: str) -> bool:
    return label in list_tokens(conf_path)


def init_token(conf_path: str | os.PathLike[str], label: str, so_pin: str, user_pin: str) -> bool:
    """Create a token with this label unless one exists; return True if it was created.

    Idempotent: an existing token is left alone (its PINs are not checked or changed).
    A lock file next to the configuration makes concurrent callers create it only once,
    because ``softhsm2-util --init-token --free`` happily creates duplicate labels.
    """
    _check_label(label)
    for what, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        _check_pin(what, pin)
    with _locked(conf_path):
        if token_exists(conf_path, label):
            return False
        pins = f"{so_pin}\n{so_pin}\n{user_pin}\n{user_pin}\n"
        _run(conf_path, ["--init-token", "--free", "--label", label], tty_input=pins)
    if not token_exists(conf_path, label):
        raise SoftHSMError(f"softhsm2-util reported success but token {label!r} is missing")
    return True


def _check_label(label: str) -> None:
    if not label or len(label.encode("utf-8")) > _MAX_LABEL_BYTES:
        raise ValueError(f"token label must be 1-{_MAX_LABEL_BYTES} bytes: {label!r}")
    if label != label.strip() or not label.isprintable():
        raise ValueError(f"token label must be printable, without outer blanks: {label!r}")


def _check_pin(what: str, pin: str) -> None:
    # The PIN goes through a terminal line discipline: control characters would be
    # interpreted (erase, kill, EOF) and silently change the PIN.
    if not 4 <= len(pin) <= 255 or not pin.isprintable():
        raise ValueError(f"{what} must be 4-255 printable characters")


@contextlib.contextmanager
def _locked(conf_path: str | os.PathLike[str]) -> Iterator[None]:
    lock_path = Path(conf_path).with_suffix(".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(
    conf_path: str | os.PathLike[str], args: list[str], tty_input: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOFTHSM2_CONF": str(Path(conf_path).resolve())}
    try:
        if tty_input is None:
            proc = subprocess.run(
                [SOFTHSM2_UTIL, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
                check=False,
            )
        else:
            proc = _run_with_tty(env, args, tty_input)
    except FileNotFoundError:
        raise SoftHSMError(
            f"{SOFTHSM2_UTIL} not found: install Debian's softhsm2 or set SOFTHSM2_UTIL"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-500:]
        raise SoftHSMError(f"softhsm2-util {args[0]} failed ({proc.returncode}): {detail}")
    return proc


def _run_with_tty(
    env: dict[str, str], args: list[str], tty_input: str
) -> subprocess.CompletedProcess[str]:
    # softhsm2-util reads PINs only from a terminal (it turns echo off), not from a pipe.
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [SOFTHSM2_UTIL, *args],
            env=env,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(slave)
        slave = -1
        os.write(master, tty_input.encode("utf-8"))
        try:
            out, err = proc.communicate(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SoftHSMError(f"softhsm2-util {args[0]} timed out") from None
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
