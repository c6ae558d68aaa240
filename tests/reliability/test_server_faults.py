"""Server-side faults: sessions killed with ``pg_terminate_backend`` during load.

Only sessions of this run's test database that the package's pool opened are
terminated (never another database's, never the observer's).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import psycopg
import pytest
from django.db import InterfaceError, OperationalError

from django_async_db import async_atomic, async_connections, pool_stats
from tests.conftest import observer, wait_until
from tests.reliability.conftest import activity, scaled, test_db_name

pytestmark = [pytest.mark.usefixtures("read_only_db"), pytest.mark.long]

MAX_SIZE = 6
WORKERS = scaled(12, 60)
OPS_PER_WORKER = scaled(40, 400)
KILL_ROUNDS = scaled(3, 20)


async def one_op(pids: set[int]) -> None:
    """A short transaction of two statements, recording the session it ran on."""
    async with async_atomic(), async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        pids.add(row[0])
        await cur.execute("SELECT pg_sleep(0.005)")


async def terminate(watch: psycopg.AsyncConnection[Any], pids: set[int]) -> int:
    """Terminate the sessions in ``pids`` still connected to the test database."""
    cur = await watch.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = %s AND pid = ANY(%s)",
        [test_db_name(), list(pids)],
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_terminated_sessions_fail_with_django_errors_then_service_resumes(
    pool_option, figures
) -> None:
    pool_option({"min_size": 2, "max_size": MAX_SIZE, "timeout": 10})
    watch = await observer()
    pids: set[int] = set()
    errors: Counter[str] = Counter()
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for _ in range(OPS_PER_WORKER):
            try:
                await one_op(pids)
            except (OperationalError, InterfaceError) as exc:
                errors[type(exc).__name__] += 1  # anything else fails the test
            else:
                ok += 1

    async def killer() -> int:
        killed = 0
        for _ in range(KILL_ROUNDS):
            await wait_until(lambda: asyncio.sleep(0, len(pids) >= 2), 10)
            await asyncio.sleep(0.1)
            killed += await terminate(watch, set(pids))
        return killed

    try:
        async with asyncio.timeout(scaled(60, 600)):
            *_, killed = await asyncio.gather(*(worker() for _ in range(WORKERS)), killer())
        assert killed >= KILL_ROUNDS, "the killer found nothing to terminate"
        assert sum(errors.values()) >= 1, "no operation saw its session terminated"
        during = dict(errors)

        # Afterwards: a connection killed while idle in the pool fails once, on
        # its next use, and is discarded; then every operation succeeds.
        stale = 0
        streak = 0
        async with asyncio.timeout(60):
            while streak < 20:
                try:
                    await asyncio.create_task(one_op(pids))
                except (OperationalError, InterfaceError):
                    stale += 1
                    streak = 0
                    assert stale <= MAX_SIZE, "errors go on after every stale session was used"
                else:
                    streak += 1

        async def refilled() -> bool:
            stats = pool_stats("default")
            return stats.get("pool_size", 0) >= 2

        assert await wait_until(refilled, 10), pool_stats("default")
        sessions = await activity(watch)
        assert not [s for s in sessions if s[1] == "idle in transaction"]
        assert pool_stats("default")["pool_size"] <= MAX_SIZE
    finally:
        await watch.close()
    figures(
        operations=WORKERS * OPS_PER_WORKER,
        succeeded=ok,
        failed_during_faults=sum(during.values()),
        errors=during,
        sessions_terminated=killed,
        stale_errors_after=stale,
        pool_size=pool_stats("default")["pool_size"],
    )


async def test_health_checks_replace_killed_idle_connections(db_options, figures) -> None:
    # CONN_HEALTH_CHECKS makes the pool check a connection before handing it out.
    from django.db import connections

    connections.settings["default"]["CONN_HEALTH_CHECKS"] = True
    db_options["pool"] = {"min_size": 3, "max_size": 3, "timeout": 10}
    pids: set[int] = set()
    await asyncio.gather(*(one_op(pids) for _ in range(6)))

    async def all_idle() -> bool:
        stats = pool_stats("default")
        return stats["pool_available"] == stats["pool_size"] == 3

    assert await wait_until(all_idle)
    watch = await observer()
    try:
        killed = await terminate(watch, pids)
        assert killed >= 1
        assert await wait_until(lambda: _gone(watch, pids))
        after: set[int] = set()
        async with asyncio.timeout(30):
            for _ in range(10):
                await asyncio.create_task(one_op(after))  # none may fail
    finally:
        await watch.close()
    assert not after & pids
    figures(sessions_terminated=killed, operations_after=10, errors_after=0)


async def _gone(watch: psycopg.AsyncConnection[Any], pids: set[int]) -> bool:
    return not {pid for pid, *_ in await activity(watch)} & pids
