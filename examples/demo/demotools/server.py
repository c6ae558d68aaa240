"""Run the demo under uvicorn in a subprocess, on a free port of 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

DEMO_DIR = Path(__file__).resolve().parent.parent
APP = "demosite.asgi:application"


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Return True if ``port`` of 127.0.0.1 can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def uvicorn_command(
    port: int, *, access_log: bool = False, log_level: str = "warning"
) -> list[str]:
    """Return the command line serving the demo on ``127.0.0.1:port``."""
    command = [sys.executable, "-m", "uvicorn", APP, "--app-dir", str(DEMO_DIR)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"]
    command += ["--log-level", log_level, "--timeout-graceful-shutdown", "10"]
    return command if access_log else [*command, "--no-access-log"]


class DemoServer:
    """The demo served by uvicorn in a subprocess until :meth:`stop`.

    Example::

        with DemoServer(orm="async_db", database_url=url) as server:
            urllib.request.urlopen(server.url + "/posts/")
        assert not server.errors()
    """

    def __init__(self, *, database_url: str, orm: str = "async_db", pool_max: int = 10) -> None:
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "demosite.settings",
            "DEMO_DATABASE_URL": database_url,
            "DEMO_ORM": orm,
            "DEMO_POOL_MAX": str(pool_max),
            "PYTHONUNBUFFERED": "1",
        }
        self.orm = orm
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"demo-{orm}-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)

    @property
    def url(self) -> str:
        """Return the server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> str:
        """Start uvicorn and wait until the demo answers ``GET /``; return the URL."""
        for _attempt in range(3):  # another process may take the port before uvicorn binds it
            self.port = free_port()
            self.process = subprocess.Popen(
                uvicorn_command(self.port),
                env=self.env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches it through stop(), not the terminal
            )
            if self._wait_ready(timeout):
                return self.url
            if "address already in use" not in self.log().lower():
                break
        self.stop()
        raise RuntimeError(f"The demo server did not start; its log:\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the server as Ctrl-C would (graceful shutdown); return its exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._log.flush()
        return process.returncode

    def log(self) -> str:
        """Return what the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def errors(self) -> list[str]:
        """Return the log lines that report an error (tracebacks, ERROR records)."""
        return [
            line
            for line in self.log().splitlines()
            if line.startswith(("Traceback", "ERROR")) or " ERROR " in line
        ]

    def close(self) -> None:
        """Stop the server and delete its log."""
        self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> DemoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
