"""After thousands of tasks (ok, failed, cancelled), nothing is left behind.

Sessions on the test database come back to the pool's size with none idle in
a transaction, no Django wrapper or bridge greenlet outlives its task, and
memory stays roughly flat.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections import Counter

import pytest
from django.db import DataError
from greenlet import greenlet

from django_async_db import async_atomic, async_connections, pool_stats
from django_async_db.backends.postgresql.base import DatabaseWrapper
from tests.conftest import observer, wait_until
from tests.reliability.conftest import APPS, activity, scaled
from tests.testapp.models import Event

pytestmark = [pytest.mark.django_db(transaction=True, available_apps=APPS), pytest.mark.long]

TASKS = scaled(2_000, 10_000)
CONCURRENCY = 50
MAX_SIZE = 8


class Boom(Exception):
    """Rolls a block back."""


async def job(n: int) -> str:
    kind = n % 5
    if kind == 0:
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT %s::int", [n])
        return "query"
    if kind == 1:
        async with async_atomic():
            await Event.objects.acreate(task=n, label="kept")
        return "committed"
    if kind == 2:
        try:
            async with async_atomic():
                await Event.objects.acreate(task=n, label="rolled back")
                raise Boom
        except Boom:
            return "failed"
    if kind == 3:
        try:
            async with async_connections["default"].cursor() as cur:
                await cur.execute("SELECT %s::int", ["not a number"])
        except DataError:
            return "sql error"
    try:
        async with asyncio.timeout(0.01), async_atomic():
            await Event.objects.acreate(task=n, label="cancelled")
            async with async_connections["default"].cursor() as cur:
                await cur.execute("SELECT pg_sleep(2)")
    except TimeoutError:
        return "cancelled"
    raise AssertionError("pg_sleep(2) was not cancelled")


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def live(kind: type) -> int:
    gc.collect()
    # type(), not isinstance(): isinstance() would evaluate lazy objects (settings, storages).
    return sum(1 for o in gc.get_objects() if issubclass(type(o), kind))


async def run_batch(start: int, count: int, kinds: Counter[str]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(n: int) -> str:
        async with gate:
            return await asyncio.create_task(job(n))

    async with asyncio.timeout(scaled(120, 900)):
        kinds.update(await asyncio.gather(*(gated(n) for n in range(start, start + count))))


async def test_no_sessions_wrappers_or_memory_left_behind(pool_option, figures) -> None:
    pool_option({"min_size": 2, "max_size": MAX_SIZE, "timeout": 30})
    watch = await observer()
    baseline = {pid for pid, *_ in await activity(watch)}  # the sync test connection, if any
    kinds: Counter[str] = Counter()
    warmup = TASKS // 4
    await run_batch(0, warmup, kinds)
    wrappers_before, greenlets_before, rss_before = live(DatabaseWrapper), live(greenlet), rss_kib()
    await run_batch(warmup, TASKS - warmup, kinds)

    async def all_returned() -> bool:
        stats = pool_stats("default")
        return stats["pool_available"] == stats["pool_size"]

    assert await wait_until(all_returned, 10), pool_stats("default")
    wrappers_after, greenlets_after, rss_after = live(DatabaseWrapper), live(greenlet), rss_kib()
    try:
        sessions = [s for s in await activity(watch) if s[0] not in baseline]
    finally:
        await watch.close()
    pool_size = pool_stats("default")["pool_size"]
    assert pool_size <= MAX_SIZE
    assert len(sessions) == pool_size, (pool_size, baseline, sessions)
    assert not [s for s in sessions if s[1] == "idle in transaction"], sessions
    assert not [s for s in sessions if s[1] == "active"], sessions
    assert wrappers_after <= wrappers_before + 2
    assert greenlets_after <= greenlets_before + 2
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 64, f"RSS grew by {growth_mib:.1f} MiB over {TASKS - warmup} tasks"
    assert await Event.objects.acount() == kinds["committed"]
    assert sum(kinds.values()) == TASKS
    figures(
        tasks=TASKS,
        **{k.replace(" ", "_"): v for k, v in sorted(kinds.items())},
        pool_size=pool_size,
        sessions=len(sessions),
        live_wrappers=f"{wrappers_before}->{wrappers_after}",
        live_greenlets=f"{greenlets_before}->{greenlets_after}",
        rss_growth_mib=round(growth_mib, 1),
    )
