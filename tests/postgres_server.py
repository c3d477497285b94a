"""A throwaway PostgreSQL cluster for one test run (``pytest --postgres``).

Debian's server binaries (``/usr/lib/postgresql/<version>/bin``, package ``postgresql``) run a
fresh cluster in a temporary directory: TCP on a free loopback port, the Unix socket in the same
directory, fsync off (the data is thrown away). The application connects as an ordinary role
with ``CREATEDB`` (so pytest-django can create its test database), not as the superuser.

``initdb`` refuses to run as root, so when the test run is root (CI containers) the server runs
as the ``postgres`` OS user that the Debian package creates; otherwise as the current user.
The server is in its own session (Ctrl-C reaches pytest, which stops it cleanly) and gets
SIGQUIT if the test process dies without cleaning up, so no cluster outlives its run.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

PG_LIB = Path("/usr/lib/postgresql")
SERVER_OS_USER = "postgres"  # created by Debian's postgresql-common
SUPERUSER = "postgres"
APP_ROLE = "modelsign"
APP_DATABASE = "modelsign"
_PR_SET_PDEATHSIG = 1


class PostgresUnavailable(RuntimeError):
    """The cluster cannot be started; the message says why and what to install."""


def server_bindir(root: Path = PG_LIB) -> Path:
    """The newest installed ``/usr/lib/postgresql/<version>/bin`` with initdb and postgres."""
    found = [p.parent for p in root.glob("*/bin/postgres") if (p.parent / "initdb").exists()]
    if not found:
        raise PostgresUnavailable(
            f"no PostgreSQL server under {root}/<version>/bin (initdb and postgres): "
            "install Debian's server with `apt-get install postgresql` (`make system-deps`)"
        )
    return max(found, key=lambda bindir: _version_key(bindir.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresCluster:
    workdir: Path
    port: int
    password: str
    proc: subprocess.Popen[bytes] | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """What ``DATABASE_URL`` takes: the application role on the loopback port."""
        return f"postgres://{APP_ROLE}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{APP_DATABASE}"

    @property
    def log(self) -> Path:
        return self.workdir / "postgres.log"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), escalate if it hangs, then delete the cluster's directory."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_cluster(timeout: float = 60) -> PostgresCluster:
    """initdb, start the server, create the application role and database; return it running."""
    bindir = server_bindir()
    run_as = _server_user()
    workdir = Path(tempfile.mkdtemp(prefix="modelsign-test-pg-"))
    cluster = PostgresCluster(workdir, port=0, password=secrets.token_urlsafe(24))
    try:
        if run_as is not None:
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        _initdb(bindir, cluster, run_as)
        _start_server(bindir, cluster, run_as, timeout)
        _create_app_database(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _server_user() -> pwd.struct_passwd | None:
    """None: run as ourselves. Root: the ``postgres`` OS user (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, but there is no {SERVER_OS_USER!r} OS user to run the server "
            "(Debian's postgresql package creates it: `apt-get install postgresql`)"
        ) from None


def _as_user(run_as: pwd.struct_passwd | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    return {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}


def _initdb(bindir: Path, cluster: PostgresCluster, run_as: pwd.struct_passwd | None) -> None:
    pwfile = cluster.workdir / "superuser.pw"
    with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(cluster.password + "\n")
    if run_as is not None:
        os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)
    command = [
        str(bindir / "initdb"), "-D", str(cluster.workdir / "data"), "-U", SUPERUSER,
        f"--pwfile={pwfile}", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
        "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=cluster.workdir, capture_output=True, text=True, check=False,
        env=_server_env(run_as), **_as_user(run_as),
    )  # fmt: skip
    pwfile.unlink()
    if done.returncode != 0:
        raise PostgresUnavailable(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _server_env(run_as: pwd.struct_passwd | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if run_as is not None:
        env.update(HOME=run_as.pw_dir, USER=run_as.pw_name, LOGNAME=run_as.pw_name)
    return env | {"LC_ALL": "C", "TZ": "UTC"}


def _start_server(
    bindir: Path, cluster: PostgresCluster, run_as: pwd.struct_passwd | None, timeout: float
) -> None:
    # The free port can be taken between asking and binding: try a few.
    for _ in range(3):
        cluster.port = free_port()
        command = [
            str(bindir / "postgres"), "-D", str(cluster.workdir / "data"),
            "-p", str(cluster.port), "-k", str(cluster.workdir),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200", "-c", "timezone=UTC",
        ]  # fmt: skip
        with cluster.log.open("ab") as log:
            cluster.proc = subprocess.Popen(
                command, cwd=cluster.workdir, env=_server_env(run_as), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
                **_as_user(run_as),
            )  # fmt: skip
        if _wait_ready(cluster, timeout):
            return
        if "could not bind" not in cluster.log.read_text(errors="replace"):
            break
    raise PostgresUnavailable(
        f"the PostgreSQL server did not start:\n{cluster.log.read_text(errors='replace')}"
    )


def _die_with_parent() -> None:
    # Runs in the child after it switched users; a crashed or SIGKILLed pytest leaves no
    # server behind (SIGQUIT: immediate shutdown, its backends go too).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)


def _wait_ready(cluster: PostgresCluster, timeout: float) -> bool:
    import psycopg

    assert cluster.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cluster.proc.poll() is None:
        try:
            psycopg.connect(**_superuser(cluster), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            time.sleep(0.1)
    if cluster.proc.poll() is None:
        cluster.proc.kill()
        cluster.proc.wait(10)
    return False


def _superuser(cluster: PostgresCluster) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": cluster.port,
        "user": SUPERUSER,
        "password": cluster.password,
        "dbname": "postgres",
    }


def _create_app_database(cluster: PostgresCluster) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(**_superuser(cluster), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(APP_ROLE), sql.Literal(cluster.password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(APP_DATABASE), sql.Identifier(APP_ROLE)
            )
        )


if __name__ == "__main__":  # a manual check: start, print the URL, stop on Enter
    running = start_cluster()
    try:
        input(f"DATABASE_URL={running.url}\nlog: {running.log}\npress Enter to stop ")
    finally:
        running.stop()
