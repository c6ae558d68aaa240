"""More waiting tasks than pooled connections: a clear PoolTimeout, never a hang."""

from __future__ import annotations

import asyncio

import pytest

from django_async_db import PoolTimeout, async_connections, pool_stats
from tests.reliability.conftest import scaled

pytestmark = [pytest.mark.usefixtures("read_only_db"), pytest.mark.long]

MAX_SIZE = 2
WAITERS = scaled(10, 100)


async def select_one() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT 1")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_waiters_beyond_pool_size_get_pool_timeout(pool_option, figures) -> None:
    pool_option({"min_size": 1, "max_size": MAX_SIZE, "timeout": 0.5})
    release = asyncio.Event()
    held = asyncio.Semaphore(0)

    async def holder() -> None:
        await select_one()
        held.release()
        await release.wait()

    holders = [asyncio.create_task(holder()) for _ in range(MAX_SIZE)]
    async with asyncio.timeout(30):  # a waiter that hangs fails the test
        for _ in range(MAX_SIZE):
            await held.acquire()
        results = await asyncio.gather(
            *(select_one() for _ in range(WAITERS)), return_exceptions=True
        )
    assert all(isinstance(r, PoolTimeout) for r in results), results
    exc = results[0]
    assert isinstance(exc, PoolTimeout)
    assert "'default'" in str(exc)
    assert f"all {MAX_SIZE} connections" in str(exc)
    assert (exc.alias, exc.max_size, exc.timeout) == ("default", MAX_SIZE, 0.5)

    release.set()
    async with asyncio.timeout(30):
        await asyncio.gather(*holders)
        # Once connections come back, the same number of tasks all succeed (in
        # waves of 10: a hundred at once could outwait the 0.5 s timeout on
        # two connections, which is the behaviour tested above).
        for start in range(0, WAITERS, 10):
            wave = min(10, WAITERS - start)
            assert await asyncio.gather(*(select_one() for _ in range(wave))) == [1] * wave
    stats = pool_stats("default")
    assert stats["pool_size"] <= MAX_SIZE
    assert stats.get("requests_waiting", 0) == 0
    figures(
        max_size=MAX_SIZE,
        waiters=WAITERS,
        pool_timeouts=len(results),
        requests_errors=stats.get("requests_errors", 0),
    )
