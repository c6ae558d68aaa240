"""A PostgreSQL restart, on a throwaway cluster this test starts (never the shared server).

During the outage requests fail fast with a Django ``OperationalError``; after
the restart service resumes in the same process, without reconfiguration.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import InterfaceError, OperationalError, connections

from django_async_db import PoolTimeout, async_connections

pytestmark = [pytest.mark.usefixtures("read_only_db"), pytest.mark.long]

ALIAS = "reliability_throwaway"
POOL_TIMEOUT = 1.0


def _provision() -> Any:
    path = Path(__file__).resolve().parents[2] / "scripts" / "provision_pg.py"
    spec = importlib.util.spec_from_file_location("_djasync_provision_pg", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Start a throwaway cluster and point an extra alias at it; tear both down."""
    provision = _provision()
    # Only binaries already on the machine: never apt-get from inside a test.
    found = [Path(p).parent for p in [shutil.which("initdb")] if p]
    bindirs = [d for d in found + provision._debian_bindirs() if provision._usable(d)]
    if not bindirs:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) for a throwaway cluster")
    bindir = bindirs[0]
    server = provision.Cluster(bindir)
    try:
        server.start()
        settings = {**connections.settings["default"], "OPTIONS": {}}
        settings.update(NAME="postgres", HOST="127.0.0.1", PORT=str(server.port))
        settings["OPTIONS"] = {
            "pool": {"min_size": 1, "max_size": 4, "timeout": POOL_TIMEOUT},
            "connect_timeout": 2,
        }
        settings["TEST"] = {**settings["TEST"], "NAME": "postgres"}
        connections.settings[ALIAS] = settings
        yield server
    finally:
        connections.settings.pop(ALIAS, None)
        server.destroy()


def pg_ctl(server: Any, *args: str) -> None:
    opts = " ".join(f"-c {k}={shlex.quote(v)}" for k, v in server_options(server).items())
    proc = server._run("pg_ctl", "-D", str(server.datadir), "-w", "-t", "60",
                       *(["-l", str(server.tmpdir / "postgres.log"), "-o",
                          f"-p {server.port} {opts}"] if args[0] == "start" else []),
                       *args)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def server_options(server: Any) -> dict[str, str]:
    provision = sys.modules["_djasync_provision_pg"]
    return {**provision.SERVER_OPTIONS, "unix_socket_directories": str(server.tmpdir)}


async def select_one() -> int:
    async with async_connections[ALIAS].cursor() as cur:
        await cur.execute("SELECT 1")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_requests_fail_fast_during_a_restart_then_resume(cluster, figures) -> None:
    try:
        async with asyncio.timeout(120):
            assert await asyncio.gather(*(select_one() for _ in range(4))) == [1] * 4

            await asyncio.to_thread(pg_ctl, cluster, "stop", "-m", "fast")
            errors: list[BaseException] = []
            slowest = 0.0
            for _ in range(6):
                start = time.monotonic()
                with pytest.raises((OperationalError, InterfaceError)) as info:
                    await asyncio.create_task(select_one())
                slowest = max(slowest, time.monotonic() - start)
                errors.append(info.value)
            # Fail fast: within the pool timeout (plus slack for a loaded machine).
            assert slowest < POOL_TIMEOUT + 5, slowest
            assert all(str(e) for e in errors)
            # A pool that cannot reconnect says so, not that it is busy.
            for error in errors:
                if isinstance(error, PoolTimeout):
                    assert "Is the server reachable?" in str(error), error

            await asyncio.to_thread(pg_ctl, cluster, "start")
            start = time.monotonic()
            attempts = 0
            while True:
                attempts += 1
                try:
                    assert await asyncio.create_task(select_one()) == 1
                    break
                except (OperationalError, InterfaceError):
                    assert time.monotonic() - start < 60, "service did not resume"
                    await asyncio.sleep(0.2)
            resumed_after = time.monotonic() - start
            assert await asyncio.gather(*(select_one() for _ in range(8))) == [1] * 8
    finally:
        await async_connections.close_all()
    figures(
        outage_errors=len(errors),
        error_types=sorted({type(e).__name__ for e in errors}),
        slowest_failure_s=round(slowest, 2),
        resumed_after_s=round(resumed_after, 2),
        attempts_after_restart=attempts,
        first_error=str(errors[0])[:120],
    )
