"""The backend: Django's postgresql wrapper, with async I/O inside a bridge."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connection, connections
from django.db.backends.postgresql import base as pg_base
from django.test import override_settings

from django_async_db import async_atomic, async_connections, await_only, run_sync
from django_async_db._pool import AsyncPool, new_generation
from django_async_db.backends.postgresql._psycopg import BridgeConnection, BridgeLock
from django_async_db.backends.postgresql.base import DatabaseWrapper
from tests.testapp.models import Author

# Real commits, each task on its own pooled connection. Only the test app's
# tables are flushed afterwards (available_apps), which keeps the teardown fast.
db = pytest.mark.django_db(transaction=True, available_apps=["django_async_db", "tests.testapp"])
# Tests that write nothing use the database without the flush.
read_only = pytest.mark.usefixtures("read_only_db")


@pytest.fixture
def read_only_db(django_db_blocker):
    """Allow database access to a test that writes nothing (so nothing to flush)."""
    with django_db_blocker.unblock():
        yield


async def test_is_djangos_postgresql_backend():
    wrapper = connections["default"]
    assert isinstance(wrapper, DatabaseWrapper)
    assert isinstance(wrapper, pg_base.DatabaseWrapper)
    assert wrapper.vendor == "postgresql"


@read_only
async def test_a_task_owned_wrapper_draws_from_the_loops_async_pool():
    wrapper = connections["default"]
    assert wrapper.is_async
    assert isinstance(wrapper.async_pool, AsyncPool)
    assert wrapper.pool is wrapper.async_pool
    await async_connections["default"].ensure_connection()
    # Django talks to psycopg's sync connection class; only its waits are async.
    assert isinstance(wrapper.connection, BridgeConnection)
    assert isinstance(wrapper.connection, psycopg.Connection)


@read_only
async def test_djangos_cursor_class_and_connection_setup_apply():
    def probe() -> tuple[type, str]:
        with connection.cursor() as cur:
            cur.execute("SHOW TimeZone")
            return type(cur.cursor), cur.fetchone()[0]

    cursor_class, timezone = await run_sync(probe)
    assert issubclass(cursor_class, pg_base.Cursor)
    assert timezone == "UTC"  # USE_TZ: Django's connection setup ran on the pooled connection


@db
async def test_outside_an_event_loop_it_is_the_stock_sync_backend():
    def in_a_plain_thread() -> tuple[bool, object, int, list[str]]:
        try:
            wrapper = connections["default"]
            Author.objects.create(name="from a thread")
            with wrapper.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pid = cur.fetchone()[0]
            return (
                wrapper.is_async,
                wrapper.pool,
                pid,
                list(Author.objects.values_list("name", flat=True)),
            )
        finally:
            connections.close_all()

    is_async, pool, pid, names = await asyncio.to_thread(in_a_plain_thread)
    assert is_async is False
    assert not isinstance(pool, AsyncPool)  # Django's own psycopg_pool ConnectionPool
    assert names == ["from a thread"]
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        assert (await cur.fetchone())[0] != pid


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("connect", ()),
        ("ensure_connection", ()),
        ("cursor", ()),
        ("commit", ()),
        ("rollback", ()),
        ("close", ()),
        ("savepoint", ()),
        ("savepoint_rollback", ("s1",)),
        ("savepoint_commit", ("s1",)),
        ("clean_savepoints", ()),
        ("get_new_connection", ({},)),
        ("create_cursor", ()),
        ("chunked_cursor", ()),
    ],
)
async def test_async_unsafe_methods_refuse_calls_outside_a_bridge(read_only_db, method, args):
    # (read_only_db lifts pytest-django's blocker, which would refuse first.)
    new_generation()  # a new wrapper, not one an earlier test's task left connected
    wrapper = connections["default"]
    with pytest.raises(SynchronousOnlyOperation, match="run_sync"):
        getattr(wrapper, method)(*args)
    assert wrapper.connection is None  # refused before doing anything


@db
async def test_the_same_methods_work_inside_a_bridge():
    wrapper = connections["default"]

    def manual_transaction() -> int:
        wrapper.ensure_connection()
        wrapper.set_autocommit(False)
        try:
            sid = wrapper.savepoint()
            Author.objects.create(name="rolled back to savepoint")
            wrapper.savepoint_rollback(sid)
            Author.objects.create(name="kept")
            wrapper.commit()
        finally:
            wrapper.set_autocommit(True)
        with wrapper.cursor() as cur:
            cur.execute("SELECT count(*) FROM testapp_author")
            return cur.fetchone()[0]

    assert await run_sync(manual_transaction) == 1
    assert [a.name async for a in Author.objects.all()] == ["kept"]
    await run_sync(wrapper.close)
    assert wrapper.connection is None


@read_only
async def test_the_loop_keeps_running_while_a_query_waits():
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    def slow_query() -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.3)")

    ticking = asyncio.create_task(ticker())
    start = time.monotonic()
    await run_sync(slow_query)
    elapsed = time.monotonic() - start
    stop.set()
    await ticking
    assert elapsed >= 0.3
    assert ticks >= 5  # the loop ran other work during the 0.3 s wait (about 30 ticks)


@read_only
async def test_isolation_level_option_applies_to_pooled_connections(db_options):
    db_options["isolation_level"] = psycopg.IsolationLevel.SERIALIZABLE
    async with async_atomic(), async_connections["default"].cursor() as cur:
        await cur.execute("SHOW transaction_isolation")
        assert await cur.fetchone() == ("serializable",)


@read_only
async def test_close_pool_from_plain_async_code_closes_the_discarded_pool():
    async def pooled_pid() -> int:
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT pg_backend_pid()")
            return (await cur.fetchone())[0]

    # A child task uses a connection and gives it back: it sits idle in the pool.
    idle_pid = await asyncio.create_task(pooled_pid())
    old = connections["default"].async_pool
    # Django's setting_changed receiver calls close_pool() outside any bridge.
    with override_settings(TIME_ZONE="Asia/Tokyo"):
        assert connections["default"].async_pool is not old
    params = connections["default"].get_connection_params()
    async with await psycopg.AsyncConnection.connect(
        dbname="postgres",
        **{k: params[k] for k in ("user", "password", "host", "port") if k in params},
        autocommit=True,
    ) as watch:
        deadline = time.monotonic() + 3
        while True:
            cur = await watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [idle_pid]
            )
            if (await cur.fetchone())[0] == 0:
                break
            assert time.monotonic() < deadline, "the discarded pool's connection stayed open"
            await asyncio.sleep(0.02)
    assert await Author.objects.acount() == 0  # a new pool serves the alias


@read_only
async def test_close_pool_discards_the_loops_pool():
    wrapper = connections["default"]
    await async_connections["default"].ensure_connection()
    old = wrapper.async_pool
    await run_sync(wrapper.close_pool)
    assert wrapper.async_pool is not old
    await run_sync(wrapper.close)
    assert await Author.objects.acount() == 0  # works on the new pool


async def test_bridge_lock_waits_on_the_loop_not_the_thread():
    lock = BridgeLock()
    order: list[str] = []

    def first() -> None:
        with lock:
            order.append("first holds")
            await_only(asyncio.sleep(0.05))  # suspended while holding the lock
            order.append("first releases")

    def second() -> None:
        await_only(asyncio.sleep(0.01))
        assert lock.locked()
        with lock:
            order.append("second holds")

    async def observer() -> None:
        await asyncio.sleep(0.02)
        order.append("loop still runs")

    await asyncio.gather(run_sync(first), run_sync(second), observer())
    assert order == ["first holds", "loop still runs", "first releases", "second holds"]
    assert not lock.locked()


@db
async def test_methods_patched_after_import_reach_this_backend(monkeypatch):
    # Error trackers and test tools patch BaseDatabaseWrapper after the backend
    # is imported: the patch must still wrap this backend's calls in a bridge.
    from django.db.backends.base.base import BaseDatabaseWrapper

    calls = []
    original = BaseDatabaseWrapper.cursor

    def traced_cursor(self, *args, **kwargs):
        calls.append(self.alias)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseDatabaseWrapper, "cursor", traced_cursor)
    assert await Author.objects.acount() >= 0
    assert calls == ["default"]


async def test_a_stock_backend_still_refuses_inside_a_bridge(read_only_db):
    # Only this ENGINE's wrappers may run on the loop; a stock one keeps
    # Django's guard (its I/O would block the loop).
    from django.db.backends.postgresql.base import DatabaseWrapper as StockWrapper

    stock = StockWrapper(dict(connections.settings["default"]), alias="stock")
    with pytest.raises(SynchronousOnlyOperation, match="sync_to_async"):
        await run_sync(stock.cursor)
