"""The async pool: one per alias per event loop, bounded, configured from OPTIONS["pool"]."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, connections

from django_async_db import PoolTimeout, async_connections, pool_stats
from tests.conftest import observer, wait_until
from tests.testapp.models import Author

# These tests only read: they use the database without a flush afterwards.
pytestmark = pytest.mark.usefixtures("read_only_db")


@pytest.fixture
def read_only_db(django_db_blocker):
    """Allow database access to a test that writes nothing (so nothing to flush)."""
    with django_db_blocker.unblock():
        yield


async def session_pids(watch: psycopg.AsyncConnection) -> set[int]:
    """Return the pids of the server sessions on the test database."""
    cur = await watch.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s",
        [connections.settings["default"]["NAME"]],
    )
    return {pid for (pid,) in await cur.fetchall()}


async def backend_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        return (await cur.fetchone())[0]


async def test_thousand_short_tasks_use_at_most_max_size_sessions(pool_option):
    pool_option({"min_size": 1, "max_size": 5, "timeout": 10})
    watch = await observer()
    try:
        baseline = await session_pids(watch)  # the sync test connections, if any
        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(await session_pids(watch) - baseline))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        pids = await asyncio.gather(*(backend_pid() for _ in range(1000)))

        async def all_returned() -> bool:
            stats = pool_stats("default")
            return stats["pool_available"] == stats["pool_size"]

        assert await wait_until(all_returned), "connections of finished tasks were not returned"
        done.set()
        await sampler
        after = await session_pids(watch) - baseline

        assert 1 <= len(set(pids)) <= 5
        assert 1 <= peak <= 5
        assert 1 <= len(after) <= 5
        stats = pool_stats("default")
        assert stats["pool_size"] <= 5
        assert stats["requests_waiting"] == 0

        await async_connections.close_all()

        async def all_closed() -> bool:
            return not (await session_pids(watch) - baseline)

        assert await wait_until(all_closed), "close_all() left sessions open"
    finally:
        await watch.close()


async def test_pool_exhausted_past_its_timeout_raises_pool_timeout(pool_option):
    pool_option({"min_size": 1, "max_size": 2, "timeout": 0.3})
    release = asyncio.Event()
    holding = asyncio.Semaphore(0)

    async def hold() -> None:
        await backend_pid()  # the task keeps its connection until it ends
        holding.release()
        await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    try:
        for _ in holders:
            await holding.acquire()
        start = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            await Author.objects.acount()
        elapsed = time.monotonic() - start
    finally:
        release.set()
        await asyncio.gather(*holders)

    assert isinstance(info.value, OperationalError)
    message = str(info.value)
    assert "'default'" in message
    assert "all 2 connections" in message
    assert info.value.alias == "default"
    assert info.value.max_size == 2
    assert 0.25 <= elapsed < 2.0
    # Once the holders are done, the same task gets a connection.
    assert await Author.objects.acount() == 0


async def test_pool_stats_reports_the_configured_pool(pool_option):
    pool_option({"min_size": 2, "max_size": 7})
    await backend_pid()
    stats = pool_stats("default")
    assert stats["pool_min"] == 2
    assert stats["pool_max"] == 7
    assert 1 <= stats["pool_size"] <= 7


async def test_pool_stats_is_empty_before_the_alias_is_used(pool_option):
    pool_option({"max_size": 3})
    assert pool_stats("default") == {}


async def test_min_size_above_default_max_size_raises_max_size(pool_option):
    pool_option({"min_size": 25})
    await backend_pid()
    assert pool_stats("default")["pool_max"] == 25


async def test_one_task_reuses_its_connection_until_it_ends():
    first = await backend_pid()
    await Author.objects.acount()
    assert await backend_pid() == first


async def test_a_finished_task_gives_its_connection_back_to_the_pool(pool_option):
    pool_option({"min_size": 1, "max_size": 1, "timeout": 2})
    first = await asyncio.create_task(backend_pid())
    # With one connection in the pool, a second task can only run on the same one.
    second = await asyncio.create_task(backend_pid())
    assert first == second
    stats = pool_stats("default")
    assert stats["pool_size"] == 1


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"max_size": 2, "bogus_option": 1}, "bogus_option"),
        ({"min_size": 5, "max_size": 2}, "max_size"),
        ({"conninfo": "dbname=x"}, "conninfo"),
        ("yes", "must be True, False or a dict"),
    ],
)
async def test_invalid_pool_options_raise_improperly_configured(pool_option, value, fragment):
    pool_option(value)
    with pytest.raises(ImproperlyConfigured) as info:
        await async_connections["default"].ensure_connection()
    message = str(info.value)
    assert "DATABASES['default']" in message
    assert fragment in message


@pytest.mark.parametrize("value", [None, True])
async def test_pool_true_or_none_uses_the_default_pool(pool_option, value):
    pool_option(value)
    assert await Author.objects.acount() == 0
    stats = pool_stats("default")
    assert stats["pool_max"] == 20


async def test_unpooled_tasks_close_their_connections_when_they_end(pool_option):
    pool_option(False)
    watch = await observer()
    try:
        baseline = await session_pids(watch)
        pids = await asyncio.gather(*(backend_pid() for _ in range(20)))
        assert len(set(pids)) == 20  # no reuse: each task connected on its own
        assert pool_stats("default") == {}

        async def all_closed() -> bool:
            return not (await session_pids(watch) - baseline) & set(pids)

        assert await wait_until(all_closed), "unpooled connections were left open"
    finally:
        await watch.close()


async def test_each_event_loop_has_its_own_pool_closed_with_the_loop():
    here = await backend_pid()
    here_pool = async_connections["default"].wrapper.async_pool
    results: list[tuple[int, object]] = []

    async def elsewhere() -> tuple[int, object]:
        return await backend_pid(), async_connections["default"].wrapper.async_pool

    def run_other_loops() -> None:
        # asyncio.run() cancels the pool's workers (often while one is still
        # connecting) and closes its loop without close_all(): that must neither
        # hang nor leave a session open.
        for _ in range(5):
            results.append(asyncio.run(elsewhere()))

    # Pools made from now on (the other loops') mark their sessions.
    options = connections.settings["default"]["OPTIONS"]
    options["application_name"] = "other-loops"
    try:
        thread = threading.Thread(target=run_other_loops, daemon=True)
        thread.start()
        await asyncio.to_thread(thread.join, 15)
    finally:
        del options["application_name"]
    assert not thread.is_alive(), "asyncio.run() hung at shutdown"
    assert len(results) == 5
    pools = [pool for _, pool in results]
    assert len({id(pool) for pool in pools}) == 5
    assert here_pool not in pools
    assert here not in {pid for pid, _ in results}
    watch = await observer()
    try:

        async def none_left() -> bool:
            cur = await watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'other-loops' "
                "AND datname = %s",
                [connections.settings["default"]["NAME"]],
            )
            return (await cur.fetchone())[0] == 0

        assert await wait_until(none_left), "a closed loop's pool left a session open"
    finally:
        await watch.close()
