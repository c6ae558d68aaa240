"""``aiterator()`` streams through a server-side cursor, on the loop, and never leaves it open."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import aclosing

import pytest
from django.db.models import Prefetch

from django_async_db import async_connections, pool_stats
from tests.orm.conftest import assert_on_loop, rolled_back
from tests.testapp.models import Author, Book, Event

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _no_cursor_left_for_the_next_test():
    """Every test leaves the pool's sessions without a cursor or an open transaction."""
    yield
    await asyncio.sleep(0.05)  # let the test's tasks give their connections back
    await all_pooled_connections_clean()


async def open_cursors() -> list[tuple[str, bool]]:
    """Return (name, is_holdable) of Django's named cursors open in this task's session."""
    async with async_connections["default"].cursor() as cur:
        await cur.execute(
            "SELECT name, is_holdable FROM pg_cursors "
            "WHERE starts_with(name, '_django_curs_') ORDER BY name"
        )
        return await cur.fetchall()


async def transaction_status() -> str:
    """Return the task's connection's transaction status name (IDLE, INTRANS ...)."""
    await async_connections["default"].ensure_connection()
    conn = async_connections["default"].wrapper.connection
    return conn.info.transaction_status.name


async def authors(n: int) -> None:
    await Author.objects.abulk_create([Author(name=f"a{i:03}") for i in range(n)])


async def test_aiterator_streams_with_a_holdable_cursor_outside_a_transaction(thread_probe):
    await authors(25)
    seen, cursors_while_reading = [], []
    async for author in Author.objects.order_by("name").aiterator(chunk_size=10):
        seen.append(author.name)
        if len(seen) in (1, 15):
            cursors_while_reading.append(await open_cursors())
    assert seen == [f"a{i:03}" for i in range(25)]
    # One named cursor, the same for the whole read; WITH HOLD in autocommit.
    assert len(cursors_while_reading[0]) == 1
    assert cursors_while_reading[0][0][1] is True
    assert cursors_while_reading[1] == cursors_while_reading[0]
    assert await open_cursors() == []  # closed once exhausted
    assert await transaction_status() == "IDLE"
    assert_on_loop(thread_probe)


async def test_aiterator_streams_inside_a_transaction(thread_probe):
    await authors(5)
    async with rolled_back():
        await authors(20)  # uncommitted: only this transaction sees them
        names = []
        async for author in Author.objects.order_by("name").aiterator(chunk_size=7):
            names.append(author.name)
            if len(names) == 1:
                [(_, holdable)] = await open_cursors()
                assert holdable is False  # a plain cursor of the transaction
        assert len(names) == 25
        assert await open_cursors() == []
        assert await transaction_status() == "INTRANS"
    assert await Author.objects.acount() == 5
    assert_on_loop(thread_probe)


@pytest.mark.parametrize("rows", [0, 10, 20])
async def test_aiterator_exhausted_at_a_chunk_boundary_closes_the_cursor(rows):
    await authors(rows)
    assert len([a async for a in Author.objects.aiterator(chunk_size=10)]) == rows
    assert await open_cursors() == []


async def test_aiterator_shapes(thread_probe):
    await authors(3)
    qs = Author.objects.order_by("name")
    assert [r async for r in qs.values("name").aiterator(chunk_size=2)] == [
        {"name": "a000"},
        {"name": "a001"},
        {"name": "a002"},
    ]
    flat = [n async for n in qs.values_list("name", flat=True).aiterator(chunk_size=2)]
    assert flat == ["a000", "a001", "a002"]
    assert_on_loop(thread_probe)


async def test_aiterator_prefetches_each_chunk(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    bob = await Author.objects.acreate(name="Bob")
    for i in range(3):
        await Book.objects.acreate(title=f"ann{i}", author=ann)
    await Book.objects.acreate(title="bob0", author=bob)
    qs = Author.objects.order_by("name").prefetch_related(
        Prefetch("books", queryset=Book.objects.order_by("title"))
    )
    result = [(a.name, [b.title for b in a.books.all()]) async for a in qs.aiterator(chunk_size=1)]
    assert result == [("Ann", ["ann0", "ann1", "ann2"]), ("Bob", ["bob0"])]
    assert_on_loop(thread_probe)


async def test_break_inside_aclosing_closes_the_cursor_at_once():
    await authors(25)
    async with aclosing(Author.objects.aiterator(chunk_size=10)) as stream:
        async for _ in stream:
            assert len(await open_cursors()) == 1
            break
    assert await open_cursors() == []
    assert await transaction_status() == "IDLE"


async def test_break_inside_a_transaction_closes_the_cursor_at_once():
    await authors(25)
    async with rolled_back():
        async with aclosing(Author.objects.aiterator(chunk_size=10)) as stream:
            async for _ in stream:
                break
        assert await open_cursors() == []
        assert await Author.objects.acount() == 25  # the transaction is still usable


async def test_plain_break_closes_the_cursor_when_the_loop_next_runs():
    await authors(25)
    async for _ in Author.objects.aiterator(chunk_size=10):
        break
    # The abandoned generator is closed by the loop's async-generator finalizer.
    for _ in range(5):
        await asyncio.sleep(0)
    assert await open_cursors() == []
    assert await transaction_status() == "IDLE"


async def test_plain_break_while_the_task_keeps_querying():
    """The finalizer's close interleaves with the task's own queries on the connection."""
    await authors(25)
    async with asyncio.timeout(10):
        async for _ in Author.objects.values_list("pk", "name").aiterator(chunk_size=10):
            break
        for _ in range(10):
            assert await Author.objects.acount() == 25
        assert await open_cursors() == []


@pytest.mark.parametrize(
    "shape",
    ["models", "values", "values_list", "flat", "named"],
)
async def test_every_iterable_shape_closes_its_cursor_on_break(shape):
    await authors(25)
    qs = Author.objects.order_by("name")
    qs = {
        "models": qs,
        "values": qs.values("name"),
        "values_list": qs.values_list("pk", "name"),
        "flat": qs.values_list("name", flat=True),
        "named": qs.values_list("name", named=True),
    }[shape]
    async with asyncio.timeout(10), aclosing(qs.aiterator(chunk_size=10)) as stream:
        async for _ in stream:
            assert len(await open_cursors()) == 1
            break
    assert await open_cursors() == []


async def test_plain_break_inside_a_transaction_closes_the_cursor():
    await authors(25)
    async with rolled_back():
        async for _ in Author.objects.aiterator(chunk_size=10):
            break
        for _ in range(5):
            await asyncio.sleep(0)
        assert await open_cursors() == []
        assert await Author.objects.acount() == 25


async def test_error_in_the_loop_body_closes_the_cursor():
    await authors(25)

    async def fail_while_reading() -> None:
        async with aclosing(Author.objects.aiterator(chunk_size=10)) as stream:
            async for _ in stream:
                raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail_while_reading()
    assert await open_cursors() == []


async def all_pooled_connections_clean(check: bool = True) -> None:
    """Check out every idle pooled connection at once; none may hold a cursor or a transaction.

    Every held cursor found is closed, so the next test starts clean.
    """
    size = pool_stats().get("pool_available", 0)  # the idle ones: all but this task's
    if not size:
        return
    barrier = asyncio.Barrier(size)
    found: list[object] = []

    async def inspect_one() -> None:
        await async_connections["default"].ensure_connection()
        await barrier.wait()  # every connection is checked out now
        found.append((await open_cursors(), await transaction_status()))
        async with async_connections["default"].cursor() as cur:
            await cur.execute("CLOSE ALL")  # leave nothing behind for later tests
        await barrier.wait()

    async with asyncio.timeout(10):
        await asyncio.gather(*(inspect_one() for _ in range(size)))
    if check:
        assert found == [([], "IDLE")] * size


async def test_task_ending_right_after_a_break_returns_a_clean_connection(caplog):
    await authors(25)

    async def first_match() -> str:
        async for author in Author.objects.order_by("name").aiterator(chunk_size=10):
            if author.name == "a003":
                return author.name
        raise AssertionError

    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert await asyncio.create_task(first_match()) == "a003"
        async with aclosing(Author.objects.filter(pk__gt=0).aiterator(chunk_size=5)) as stream:
            async for _ in stream:
                break
    await asyncio.sleep(0.1)  # releases of the finished tasks
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await all_pooled_connections_clean()


async def test_reader_failing_in_the_loop_body_leaves_clean_connections():
    await authors(25)

    async def failing_reader() -> None:
        async for _ in Author.objects.aiterator(chunk_size=10):
            raise KeyError("boom")

    task = asyncio.create_task(failing_reader())
    with pytest.raises(KeyError):
        await task  # the task keeps the traceback, and so the abandoned read
    await asyncio.sleep(0.1)
    await all_pooled_connections_clean()


async def test_cancelled_reader_leaves_clean_connections():
    await authors(25)
    reading = asyncio.Event()

    async def slow_reader() -> None:
        async for _ in Author.objects.aiterator(chunk_size=10):
            reading.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(slow_reader())
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    await all_pooled_connections_clean()


def rss_bytes() -> int:
    """Return the current RSS (ru_maxrss would hide growth below an earlier test's peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_million_rows_stream_in_bounded_memory(thread_probe):
    async with async_connections["default"].cursor() as cur:
        await cur.execute(
            f"INSERT INTO {Event._meta.db_table} (task, label, txid) "
            "SELECT g, 'row ' || g, g FROM generate_series(1, 1000000) g"
        )
    baseline = peak = rss_bytes()
    count = total = 0
    async for event in Event.objects.aiterator(chunk_size=2000):
        count += 1
        total += event.task
        if count % 20_000 == 0:
            peak = max(peak, rss_bytes())
        if count == 500_000:
            assert len(await open_cursors()) == 1  # read through a server-side cursor
    assert count == 1_000_000
    assert total == 1_000_000 * 1_000_001 // 2
    growth = peak - baseline
    assert growth < 100 * 2**20, f"RSS grew by {growth / 2**20:.0f} MB while streaming"
    assert_on_loop(thread_probe)
