"""Cancelling a task mid-query cancels the query server-side and leaves a clean connection."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.db import connection, connections
from psycopg import pq

from django_async_db import async_atomic, async_connections, pool_stats, run_sync
from tests.testapp.models import Author, Event

# Real commits, each task on its own pooled connection. Only the test app's
# tables are flushed afterwards (available_apps), which keeps the teardown fast.
APPS = ["django_async_db", "tests.testapp"]
pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)

IDLE = pq.TransactionStatus.IDLE


async def backend_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        return (await cur.fetchone())[0]


async def running_sleeps() -> int:
    """Count the ``pg_sleep(5)`` queries the server is running (seen from another task)."""

    async def probe() -> int:
        async with async_connections["default"].cursor() as cur:
            await cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
                ["%pg_sleep(5)%"],
            )
            return (await cur.fetchone())[0]

    return await asyncio.create_task(probe())


def transaction_status():
    return connections["default"].connection.pgconn.transaction_status


async def sleep_5() -> None:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_sleep(5)")


async def test_timeout_inside_async_atomic_cancels_the_query_and_rolls_back():
    pid = await backend_pid()

    async def block() -> None:
        async with asyncio.timeout(0.2), async_atomic():
            await Event.objects.acreate(task=1, label="before the sleep")
            await sleep_5()

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await block()
    elapsed = time.monotonic() - start

    assert elapsed < 2.0, f"the cancelled query ran on for {elapsed:.2f} s"
    assert await running_sleeps() == 0, "pg_sleep still runs on the server"
    assert transaction_status() == IDLE
    assert not async_connections["default"].in_atomic_block
    assert await Event.objects.acount() == 0  # nothing committed
    # The same connection is reused, and works.
    assert await backend_pid() == pid
    async with async_atomic():
        await Event.objects.acreate(task=1, label="after")
    assert await Event.objects.acount() == 1


async def test_timeout_in_autocommit_mode_cancels_the_query():
    pid = await backend_pid()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await sleep_5()
    assert await running_sleeps() == 0
    assert transaction_status() == IDLE
    assert await backend_pid() == pid


async def test_timeout_in_sync_orm_code_run_through_the_bridge():
    def create_then_sleep() -> None:
        Event.objects.create(task=2, label="sync")
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(5)")

    async def block() -> None:
        async with asyncio.timeout(0.2), async_atomic():
            await run_sync(create_then_sleep)

    with pytest.raises(TimeoutError):
        await block()
    assert await running_sleeps() == 0
    assert transaction_status() == IDLE
    assert await Event.objects.acount() == 0


async def test_cancelled_between_queries_rolls_back():
    entered = asyncio.Event()

    async def block() -> None:
        async with async_atomic():
            await Event.objects.acreate(task=3, label="doomed")
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(block())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await Event.objects.acount() == 0


async def test_cancelled_task_returns_a_clean_connection_to_the_pool(pool_option):
    pool_option({"min_size": 1, "max_size": 1, "timeout": 5})
    started = asyncio.Event()
    pids: list[int] = []

    async def victim() -> None:
        async with async_atomic():
            pids.append(await backend_pid())
            await Event.objects.acreate(task=4, label="doomed")
            started.set()
            await sleep_5()

    task = asyncio.create_task(victim())
    await started.wait()
    await asyncio.sleep(0.1)  # pg_sleep is running now
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - start < 2.0

    async def next_user() -> tuple[int, object, int]:
        # The pool has one connection: this task gets the victim's.
        pid = await backend_pid()
        return pid, transaction_status(), await Event.objects.acount()

    pid, status, count = await asyncio.create_task(next_user())
    assert pid == pids[0]
    assert status == IDLE
    assert count == 0
    stats = pool_stats("default")
    assert stats["pool_size"] == 1
    assert stats.get("returns_bad", 0) == 0


async def test_cancelled_while_waiting_for_a_pooled_connection(pool_option):
    pool_option({"min_size": 1, "max_size": 1, "timeout": 5})
    release = asyncio.Event()
    held = asyncio.Event()

    async def holder() -> None:
        await backend_pid()
        held.set()
        await release.wait()

    holding = asyncio.create_task(holder())
    await held.wait()
    waiter = asyncio.create_task(Author.objects.acount())
    await asyncio.sleep(0.1)
    assert pool_stats("default")["requests_waiting"] == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holding
    # The holder's connection comes back (skipping the cancelled waiter) and serves us.
    assert await asyncio.wait_for(Author.objects.acount(), 2) == 0
    assert pool_stats("default")["requests_waiting"] == 0
    assert pool_stats("default")["pool_size"] == 1


async def test_a_commit_in_progress_is_not_interrupted_by_cancellation():
    body_done = asyncio.Event()

    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="committed despite the cancel")
            async with async_connections["default"].cursor() as cur:
                # A deferred trigger makes COMMIT itself take 0.5 s on the server.
                await cur.execute(
                    "CREATE OR REPLACE FUNCTION pg_temp.slow_commit() RETURNS trigger "
                    "LANGUAGE plpgsql "
                    "AS $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$"
                )
                await cur.execute("CREATE TEMP TABLE slow (x int) ON COMMIT DROP")
                await cur.execute(
                    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    "EXECUTE FUNCTION pg_temp.slow_commit()"
                )
                await cur.execute("INSERT INTO slow VALUES (1)")
            body_done.set()

    task = asyncio.create_task(block())
    await body_done.wait()
    await asyncio.sleep(0.2)  # COMMIT is running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await Author.objects.filter(name="committed despite the cancel").aexists()
