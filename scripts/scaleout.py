#!/usr/bin/env python3
"""Throwaway scale-out components for tests: PgBouncer, and a primary with a streaming replica.

Usage::

    python scripts/scaleout.py pgbouncer -- CMD [ARGS...]

runs CMD with ``DATABASE_URL`` pointing at a PgBouncer in transaction pooling
mode, started on a free local port in front of the server of the current
``DATABASE_URL`` (which ``scripts/provision_pg.py`` provides), and stops it
afterwards. CMD also gets ``DJASYNC_PGBOUNCER_ADMIN_URL`` (PgBouncer's admin
console) and ``DJASYNC_DIRECT_DATABASE_URL`` (the server behind it).

The test suite imports this module for the same components
(``tests/scaleout/conftest.py``): :class:`PgBouncer` and
:func:`primary_and_replica`. PgBouncer comes from ``PATH`` or ``/usr/sbin``,
else from Debian's ``pgbouncer`` package installed with apt-get (only when
``CI`` is set or ``DJASYNC_ALLOW_APT=1``). Like PostgreSQL, it refuses to run
as root: as root it runs as provision_pg's unprivileged account.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provision_pg import (
    Cluster,
    ProvisionError,
    apt_allowed,
    apt_install,
    cleanup_on_exit,
    find_bindir,
    free_port,
    info,
    mask_url,
    private_tmpdir,
    run_command,
    server_account,
    spawn_as,
    tcp_check,
)

USAGE = "usage: python scripts/scaleout.py pgbouncer -- CMD [ARGS...]"

#: PgBouncer settings for the tests; docs/scaling.md explains the ones that matter.
PGBOUNCER_SETTINGS = {
    "pool_mode": "transaction",
    "auth_type": "trust",
    "max_client_conn": "500",
    # Server connections per (database, user): the shared test server has few to spare.
    "default_pool_size": "20",
    "reserve_pool_size": "0",
    "ignore_startup_parameters": "extra_float_digits",
}


def find_pgbouncer() -> Path:
    """Return the ``pgbouncer`` executable, installing Debian's package if allowed."""
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    if apt_allowed() and shutil.which("apt-get"):
        apt_install("pgbouncer")
        if os.access("/usr/sbin/pgbouncer", os.X_OK):
            return Path("/usr/sbin/pgbouncer")
    raise ProvisionError(
        "PgBouncer is not installed: install Debian's pgbouncer package, or rerun with "
        "DJASYNC_ALLOW_APT=1 (as root) to let the test setup install it."
    )


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """A PgBouncer in transaction pooling mode, in front of one PostgreSQL server.

    Every database name is forwarded to the server (a ``*`` entry), so test
    databases created later are reachable through it.
    """

    def __init__(self, server_url: str, settings: dict[str, str] | None = None) -> None:
        parts = urlsplit(server_url)
        self.user = unquote(parts.username or "postgres")
        self.password = unquote(parts.password or "")
        self.server_host = parts.hostname or "127.0.0.1"
        self.server_port = parts.port or 5432
        self.settings = {**PGBOUNCER_SETTINGS, **(settings or {})}
        self.executable = find_pgbouncer()
        self.account = server_account()
        self.tmpdir = private_tmpdir("djasync-pgbouncer-", self.account)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str = "postgres") -> str:
        """Return the URL of *dbname* through PgBouncer (``pgbouncer``: the admin console)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def admin_url(self) -> str:
        """Return the URL of PgBouncer's admin console (``SHOW POOLS``, ``KILL db`` ...)."""
        return self.url("pgbouncer")

    def _write_config(self) -> Path:
        (self.tmpdir / "userlist.txt").write_text(
            f"{_quote(self.user)} {_quote(self.password)}\n", encoding="utf-8"
        )
        settings = {
            **self.settings,
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_file": str(self.tmpdir / "userlist.txt"),
            "admin_users": self.user,
            "pidfile": str(self.tmpdir / "pgbouncer.pid"),
        }
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        config = self.tmpdir / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if self.account is not None:
            for path in self.tmpdir.iterdir():
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        return config

    def start(self) -> str:
        """Start PgBouncer on a free port; return the URL of ``postgres`` through it."""
        log = self.tmpdir / "pgbouncer.log"
        for _attempt in range(5):  # Another process may take the port before we bind it.
            self.port = free_port()
            config = self._write_config()
            self.process = spawn_as(
                self.account, [str(self.executable), str(config)], self.tmpdir, log
            )
            deadline = time.monotonic() + 20
            while self.process.poll() is None and time.monotonic() < deadline:
                if tcp_check("127.0.0.1", self.port, timeout=0.5) is None:
                    return self.url()
                time.sleep(0.05)
            self.stop()
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Address already in use" not in text:
                tail = " ".join(text.split()[-60:])
                raise ProvisionError(f"PgBouncer ({self.executable}) did not start: {tail}")
        raise ProvisionError("PgBouncer did not start: no port could be bound.")

    def stop(self) -> None:
        """Stop PgBouncer at once (SIGTERM: immediate shutdown)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def destroy(self) -> None:
        """Stop PgBouncer and delete its temporary directory."""
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer(server_url: str, *, as_interrupt: bool = False) -> Iterator[PgBouncer]:
    """Run a :class:`PgBouncer` in front of *server_url* for the block; always remove it.

    ``as_interrupt``: see :func:`provision_pg.cleanup_on_exit`.
    """
    with cleanup_on_exit(as_interrupt=as_interrupt) as cleanup:
        t0 = time.monotonic()
        bouncer = PgBouncer(server_url)
        cleanup.callback(bouncer.destroy)
        bouncer.start()
        who = f" as user {bouncer.account.pw_name}" if bouncer.account else ""
        info(
            f"started PgBouncer ({bouncer.executable}, transaction pooling){who} in "
            f"{time.monotonic() - t0:.1f}s on port {bouncer.port}, in front of "
            f"{mask_url(server_url)}"
        )
        yield bouncer


@contextlib.contextmanager
def primary_and_replica(*, as_interrupt: bool = False) -> Iterator[tuple[Cluster, Cluster]]:
    """Start a throwaway primary and a streaming replica of it; always remove both.

    The primary is a fresh cluster (``wal_level=replica``); the replica is made
    from it with ``pg_basebackup -R`` and runs in hot standby. ``as_interrupt``:
    see :func:`provision_pg.cleanup_on_exit`.
    """
    with cleanup_on_exit(as_interrupt=as_interrupt) as cleanup:
        t0 = time.monotonic()
        bindir = find_bindir(tools=("pg_basebackup",))
        primary = Cluster(bindir, {"wal_level": "replica", "max_wal_senders": "4"})
        cleanup.callback(primary.destroy)
        primary.start()
        replica = Cluster(bindir, {"hot_standby": "on"})
        cleanup.callback(replica.destroy)
        replica.start_replica_of(primary)
        info(
            f"started a primary (port {primary.port}) and a streaming replica "
            f"(port {replica.port}) in {time.monotonic() - t0:.1f}s"
        )
        yield primary, replica


def main(argv: list[str]) -> int:
    """Run the command after ``--`` with the component named first; return its status."""
    if len(argv) < 3 or argv[0] != "pgbouncer" or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    url = os.environ.get("DATABASE_URL")
    if not url:
        print(
            "error: DATABASE_URL is not set (run through scripts/provision_pg.py).", file=sys.stderr
        )
        return 2
    try:
        with pgbouncer(url) as bouncer:
            dbname = unquote(urlsplit(url).path.lstrip("/")) or "postgres"
            env = {
                **os.environ,
                "DATABASE_URL": bouncer.url(dbname),
                "DJASYNC_PGBOUNCER_ADMIN_URL": bouncer.admin_url,
                "DJASYNC_DIRECT_DATABASE_URL": url,
            }
            return run_command(argv[2:], env)
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
