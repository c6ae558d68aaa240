"""Concurrent tasks: each has its own connection and transactions, and waits overlap."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from django.db import connection, connections

from django_async_db import async_atomic, async_connections, pool_stats, run_sync
from tests.testapp.models import Author, Event

# Real commits, each task on its own pooled connection. Only the test app's
# tables are flushed afterwards (available_apps), which keeps the teardown fast.
APPS = ["django_async_db", "tests.testapp"]
pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)

TASKS = 50
KEPT_BLOCKS = 3


def held_by_task() -> bool:
    """Return True if a task keeps its connection, so backend pids identify connections.

    Not in the PgBouncer run (``tests.settings_pgbouncer``: ``OPTIONS["release"] =
    "idle"``): a task gives its connection back between calls, another task may
    get it next, and PgBouncer maps each transaction to any server session.
    """
    return connections.settings["default"]["OPTIONS"].get("release", "task") == "task"


class Boom(Exception):
    """Raised inside a block to roll it back."""


async def txid() -> tuple[int, int]:
    """Return (server transaction id, backend pid) seen by this task's connection."""
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT txid_current(), pg_backend_pid()")
        return await cur.fetchone()


def sync_txid_and_insert(task: int, label: str) -> tuple[int, int]:
    """Plain sync Django code, run through run_sync inside the task's transaction."""
    with connection.cursor() as cur:
        cur.execute("SELECT txid_current(), pg_backend_pid()")
        seen = cur.fetchone()
    Event.objects.create(task=task, label=label, txid=seen[0])
    return seen


Block = list[tuple[int, int]]


async def worker(task: int) -> tuple[list[Block], Block]:
    """Run KEPT_BLOCKS committed blocks and one rolled-back block; return what they saw."""
    kept: list[Block] = []
    for block in range(KEPT_BLOCKS):
        async with async_atomic():
            seen = [await txid()]
            await asyncio.sleep(0)
            seen.append(await txid())
            await Event.objects.acreate(task=task, label=f"kept-{block}", txid=seen[0][0])
            await asyncio.sleep(0)
            seen.append(await run_sync(sync_txid_and_insert, task, f"kept-{block}-sync"))
            seen.append(await txid())
        kept.append(seen)
    doomed: Block = []
    with pytest.raises(Boom):
        await doomed_block(task, doomed)
    return kept, doomed


async def doomed_block(task: int, seen: Block) -> None:
    """Write rows in a block, then raise: none of them may survive."""
    async with async_atomic():
        seen.append(await txid())
        await Event.objects.acreate(task=task, label="doomed", txid=seen[0][0])
        await asyncio.sleep(0)
        seen.append(await run_sync(sync_txid_and_insert, task, "doomed-sync"))
        await asyncio.sleep(0)
        seen.append(await txid())
        raise Boom


async def run_workers() -> set[int]:
    """Run TASKS workers at once, check their transactions; return the backend pids used."""
    # The parent touches the connection first: children must not inherit it.
    parent_pid = await backend_pid()
    assert await Event.objects.acount() == 0

    results = await asyncio.gather(*(worker(n) for n in range(TASKS)))

    all_blocks = [block for kept, doomed in results for block in [*kept, doomed]]
    for block in all_blocks:
        assert len(set(block)) == 1, f"one block saw several transactions: {block}"
    block_txids = [block[0][0] for block in all_blocks]
    assert len(set(block_txids)) == TASKS * (KEPT_BLOCKS + 1), "two blocks shared a transaction"
    pids = {block[0][1] for block in all_blocks}
    if held_by_task():
        assert parent_pid not in pids, "a child task used the parent's connection"

    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT task, label, txid, xmin::text::bigint FROM testapp_event")
        rows = await cur.fetchall()
    assert not [r for r in rows if r[1].startswith("doomed")], "rolled-back rows survived"
    assert len(rows) == TASKS * KEPT_BLOCKS * 2
    kept_txids = {n: {block[0][0] for block in kept} for n, (kept, _) in enumerate(results)}
    for task, _label, row_txid, xmin in rows:
        assert row_txid in kept_txids[task]
        # The row was written by the very transaction the block observed.
        assert row_txid % 2**32 == xmin
    if held_by_task():
        assert await backend_pid() == parent_pid
    return pids | {parent_pid}


async def backend_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        return (await cur.fetchone())[0]


async def test_concurrent_tasks_each_run_their_blocks_in_their_own_transactions():
    await run_workers()


async def test_concurrent_tasks_on_a_pool_smaller_than_the_task_count(pool_option):
    pool_option({"min_size": 1, "max_size": 10, "timeout": 10})
    pids = await run_workers()
    if held_by_task():
        assert len(pids) <= 10
    assert pool_stats("default")["pool_max"] == 10


async def test_child_tasks_never_see_the_parent_connection():
    parent = await backend_pid()
    async with async_atomic():
        await Author.objects.acreate(name="uncommitted")
        children = await asyncio.gather(*(child_view() for _ in range(5)))
    for pid, in_atomic, visible in children:
        assert pid != parent
        assert in_atomic is False
        assert visible == 0  # the parent's uncommitted row is not in their snapshot


async def child_view() -> tuple[int, bool, int]:
    pid = await backend_pid()
    return pid, async_connections["default"].in_atomic_block, await Author.objects.acount()


async def test_gathered_queries_wait_concurrently():
    async def sleep_query(seconds: float) -> None:
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT pg_sleep(%s)", [seconds])

    def sync_sleep_query(seconds: float) -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(%s)", [seconds])

    async def one(i: int) -> None:
        if i % 2:
            await sleep_query(0.2)
        else:
            await run_sync(sync_sleep_query, 0.2)

    await asyncio.gather(*(one(i) for i in range(10)))  # warm the pool up to 10 connections
    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(10)))
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 1.0, f"10 x pg_sleep(0.2) took {elapsed:.2f} s"


async def test_thread_count_does_not_grow_under_load():
    async def query(i: int) -> None:
        await Author.objects.filter(pk=i).aexists()
        async with async_atomic():
            await Event.objects.acreate(task=i, label="load")
            await asyncio.sleep(0)

    await asyncio.gather(*(query(i) for i in range(64)))  # warm up
    before = threading.active_count()
    for _ in range(2):
        await asyncio.gather(*(query(i) for i in range(64)))
    assert threading.active_count() <= before
    assert await Event.objects.acount() == 3 * 64


async def test_every_statement_runs_on_the_loop_thread(thread_probe):
    def sync_work() -> int:
        author = Author.objects.create(name="sync")
        return Author.objects.filter(pk=author.pk).count()

    async def task(i: int) -> None:
        async with async_atomic():
            await Author.objects.acreate(name=f"a{i}")
            await run_sync(sync_work)
            async with async_connections["default"].cursor() as cur:
                await cur.execute("SELECT 1")
        async for _ in Author.objects.all():
            pass

    await asyncio.gather(*(task(i) for i in range(8)))
    assert await Author.objects.acount() == 16
    assert thread_probe() == {threading.get_ident()}
