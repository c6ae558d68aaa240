"""The direct road of a cache hit: its query awaited in plain async code, no bridge.

What Django's cursor layer does on that road is checked here against real
PostgreSQL: errors become Django's and mark the connection, a cancellation
cancels the query on the server, and anything the layer would add (execute
wrappers, query logging, ``connection_created`` receivers) sends the call
through the bridge instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import zoneinfo
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connections
from django.db.backends.signals import connection_created

from django_async_db import _bridge, _fastpath, _pool, async_atomic, compiled_sql_cache_info
from tests.conftest import observer, wait_until
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def bridge_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every function the fast path hands to ``run_sync``."""
    calls: list[str] = []
    run_sync = _bridge.run_sync

    async def counting(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(_fastpath, "run_sync", counting)
    return calls


async def in_task(coro: Any) -> Any:
    result = await asyncio.create_task(coro)
    await asyncio.sleep(0)  # the task's done callbacks (its release) run now
    return result


async def test_a_hit_in_a_new_task_runs_without_a_bridge(bridge_calls: list[str]) -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    bob = await Author.objects.acreate(name="Bob", bio="b")
    assert (await in_task(Author.objects.aget(pk=ann.pk))).name == "Ann"  # the miss
    bridge_calls.clear()
    direct = _fastpath._direct_hits
    for _ in range(3):
        # A new task each time: it takes the wrapper the last one left (with or
        # without its connection) and connects without Django's connect().
        got = await in_task(Author.objects.aget(pk=bob.pk))
        assert (got.pk, got.name, got._state.db, got._state.adding) == (
            bob.pk,
            "Bob",
            "default",
            False,
        )
    assert bridge_calls == []
    assert _fastpath._direct_hits - direct == 3


async def test_a_wrapper_that_connected_before_connects_without_djangos_connect(
    bridge_calls: list[str],
) -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss; connected through Django's connect()
    wrapper = connections["default"]
    await _bridge.run_sync(wrapper.close)  # back to the pool: a wrapper without connection
    assert wrapper.connection is None
    bridge_calls.clear()
    assert (await Author.objects.aget(pk=ann.pk)).name == "Ann"
    assert bridge_calls == []  # aconnect() took a connection: no bridge, no connect()
    assert wrapper.connection is not None
    assert (wrapper.autocommit, wrapper.in_atomic_block, wrapper.health_check_done) == (
        True,
        False,
        True,
    )
    assert wrapper.connection.autocommit is True
    # An atomic block still works on it (Django's own transaction handling).
    async with async_atomic():
        await Author.objects.filter(pk=ann.pk).aupdate(name="Anne")
    assert (await Author.objects.aget(pk=ann.pk)).name == "Anne"


async def test_execute_wrappers_and_query_logging_take_djangos_cursor(
    bridge_calls: list[str],
) -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss
    seen: list[str] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    bridge_calls.clear()
    with connections["default"].execute_wrapper(record):
        assert (await Author.objects.aget(pk=ann.pk)).name == "Ann"
    assert len(seen) == 1
    assert '"testapp_author"' in seen[0]
    wrapper = connections["default"]
    wrapper.force_debug_cursor = True  # what assertNumQueries and DEBUG = True turn on
    try:
        logged = len(wrapper.queries_log)
        assert (await Author.objects.aget(pk=ann.pk)).name == "Ann"
        assert len(wrapper.queries_log) == logged + 1
        assert str(ann.pk) in wrapper.queries_log[-1]["sql"]
    finally:
        wrapper.force_debug_cursor = False
    assert bridge_calls == ["_run_hit", "_run_hit"]


async def test_a_connection_created_receiver_runs_on_each_checkout(
    pool_option: Any, bridge_calls: list[str]
) -> None:
    pool_option({"min_size": 1, "max_size": 2})
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await in_task(Author.objects.aget(pk=ann.pk))  # the miss
    created: list[Any] = []

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        created.append(connection)

    connection_created.connect(on_created)
    try:
        bridge_calls.clear()
        await asyncio.gather(
            in_task(Author.objects.aget(pk=ann.pk)), in_task(Author.objects.aget(pk=ann.pk))
        )
    finally:
        connection_created.disconnect(on_created)
    # At least one of the two tasks connected: through Django's connect(), in a
    # bridge, so the receiver ran; the query itself still took the direct road.
    assert created
    assert sum("ensure_connection" in name for name in bridge_calls) == len(created)
    assert "_run_hit" not in bridge_calls


async def test_a_database_error_is_djangos_and_marks_the_connection() -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss (and this task's connection)
    wrapper = connections["default"]
    pid = wrapper.connection.info.backend_pid
    watch = await observer()
    try:
        await watch.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        await watch.close()
    hits = compiled_sql_cache_info().hits
    with pytest.raises(OperationalError) as info:
        await Author.objects.aget(pk=ann.pk)
    assert compiled_sql_cache_info().hits == hits + 1
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert wrapper.errors_occurred is True
    # Django's own check at the end of a request now discards the connection.
    await _bridge.run_sync(wrapper.close_if_unusable_or_obsolete)
    assert wrapper.connection is None
    assert (await Author.objects.aget(pk=ann.pk)).name == "Ann"


async def test_a_cancelled_hit_cancels_its_query_and_the_connection_stays_usable() -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss
    ready, go = asyncio.Event(), asyncio.Event()
    seen: dict[str, Any] = {}

    async def reader() -> None:
        await Author.objects.aget(pk=ann.pk)  # connects this task
        seen["wrapper"] = wrapper = connections["default"]
        seen["pid"] = wrapper.connection.info.backend_pid
        ready.set()
        await go.wait()
        await Author.objects.aget(pk=ann.pk)  # waits for the table lock

    params = connections["default"].get_connection_params()
    login = {k: params[k] for k in ("user", "password", "host", "port") if k in params}
    blocker = await psycopg.AsyncConnection.connect(dbname=params["dbname"], **login)
    watch = await observer()

    async def state() -> tuple[str, str] | None:
        cur = await watch.execute(
            "SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", [seen["pid"]]
        )
        return await cur.fetchone()  # type: ignore[return-value]

    try:
        task = asyncio.create_task(reader())
        await ready.wait()
        await blocker.execute("LOCK TABLE testapp_author IN ACCESS EXCLUSIVE MODE")
        go.set()
        assert await wait_until(lambda: _async_state(state, ("active", "Lock")), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Cancelled on the server too: the session is idle, the lock still held.
        assert await wait_until(lambda: _async_state(state, ("idle", "Client")), 5)
    finally:
        await blocker.rollback()
        await blocker.close()
        await watch.close()
    conn = seen["wrapper"].connection
    assert conn is None or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert (await in_task(Author.objects.aget(pk=ann.pk))).name == "Ann"


async def _async_state(state: Any, expected: tuple[str, str]) -> bool:
    return await state() == expected


# The direct hits' cursor, kept on the connection


async def test_direct_hits_reuse_one_cursor_and_free_its_result() -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the misses
    await Author.objects.filter(pk=ann.pk).afirst()
    direct = _fastpath._direct_hits
    await Author.objects.aget(pk=ann.pk)
    view = connections["default"].connection
    assert view.hit_cursor is not None
    cursor = view.hit_cursor[0]
    assert (await Author.objects.filter(pk=ann.pk).afirst()).name == "Ann"  # type: ignore[union-attr]
    assert (await Author.objects.aget(pk=ann.pk)).name == "Ann"
    assert _fastpath._direct_hits - direct == 3
    assert view.hit_cursor[0] is cursor
    assert not cursor.closed
    assert cursor.pgresult is None  # the last result is not kept alive


async def test_a_loader_registered_on_the_connection_applies_to_the_next_hit() -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss
    await Author.objects.aget(pk=ann.pk)
    view = connections["default"].connection
    kept = view.hit_cursor[0]

    class Shouting(psycopg.types.string.TextLoader):  # type: ignore[misc]
        def load(self, data: Any) -> str:
            return str(super().load(data)).upper()

    view.adapters.register_loader("varchar", Shouting)
    try:
        got = await Author.objects.aget(pk=ann.pk)
        theirs = await _bridge.run_sync(lambda: Author.objects.using("default").get(pk=ann.pk))
    finally:
        view.adapters.register_loader("varchar", psycopg.types.string.TextLoader)
    assert got.name == theirs.name == "ANN"  # Django's cursor sees it too
    assert view.hit_cursor[0] is not kept


async def test_a_new_time_zone_gets_a_new_cursor() -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss
    await Author.objects.aget(pk=ann.pk)
    wrapper = connections["default"]
    view = wrapper.connection
    kept = view.hit_cursor[0]
    # What Django's setting_changed receiver does when TIME_ZONE or USE_TZ changes.
    wrapper.__dict__["timezone"] = zoneinfo.ZoneInfo("Asia/Tokyo")
    try:
        await Author.objects.aget(pk=ann.pk)
        assert view.hit_cursor[0] is not kept
    finally:
        del wrapper.timezone


async def test_a_failed_hit_drops_its_cursor() -> None:
    ann = await Author.objects.acreate(name="Ann", bio="a")
    await Author.objects.aget(pk=ann.pk)  # the miss
    await Author.objects.aget(pk=ann.pk)
    wrapper = connections["default"]
    view = wrapper.connection
    kept = view.hit_cursor[0]
    watch = await observer()
    try:
        await watch.execute("SELECT pg_terminate_backend(%s)", [view.info.backend_pid])
    finally:
        await watch.close()
    with pytest.raises(OperationalError):
        await Author.objects.aget(pk=ann.pk)
    assert view.hit_cursor is None
    assert kept.closed


# Giving a connection back from the task's done callback (run_now)


async def test_run_now_finishes_a_coroutine_that_must_wait_in_a_task() -> None:
    loop = asyncio.get_running_loop()
    gate = loop.create_future()
    steps: list[str] = []

    async def give_back() -> None:
        steps.append("start")
        steps.append(await gate)

    _pool.run_now(give_back(), loop)
    assert steps == ["start"]  # ran now, up to its wait
    await asyncio.sleep(0.01)  # the task taking over now waits too
    gate.set_result("resumed")
    assert await wait_until(lambda: _async(steps == ["start", "resumed"]), 2)

    async def quick() -> None:
        steps.append("quick")

    _pool.run_now(quick(), loop)
    assert steps[-1] == "quick"  # no wait: done before run_now() returns


async def test_run_now_hands_a_wait_on_a_held_lock_to_a_task() -> None:
    # psycopg_pool's putconn() waits like this when its lock is held.
    lock = asyncio.Lock()
    await lock.acquire()
    done: list[str] = []

    async def give_back() -> None:
        async with lock:
            done.append("returned")

    loop = asyncio.get_running_loop()
    _pool.run_now(give_back(), loop)
    await asyncio.sleep(0.01)  # the task taking over now waits for the lock
    assert done == []
    lock.release()
    assert await wait_until(lambda: _async(done == ["returned"]), 2)


async def test_run_now_logs_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise RuntimeError("no")

    with caplog.at_level(logging.ERROR, logger="django_async_db"):
        _pool.run_now(fail(), asyncio.get_running_loop())
    assert "Returning connections to the pool failed" in caplog.text


async def _async(value: bool) -> bool:
    return value


# The Django methods the direct road and aconnect() do the work of, as reviewed
# (sha256 of their source, first 16 hex digits): a Django release that changes
# one fails here, to be compared with _fastpath._hit() and aconnect() again.
REVIEWED = {
    "BaseDatabaseWrapper.connect": "65ad70c3f9c2250f",
    "BaseDatabaseWrapper.set_autocommit": "4e91610fe9d81813",
    "BaseDatabaseWrapper._cursor": "bb632516d005185c",
    "BaseDatabaseWrapper._prepare_cursor": "92079d0eed95d59d",
    "BaseDatabaseWrapper.init_connection_state": "40512634023b2bc3",
    "DatabaseWrapper.get_new_connection": "acc4e253c2e311a4",
    "DatabaseWrapper.init_connection_state": "12b01188fb5ea830",
    "DatabaseWrapper._set_autocommit": "d3702faf3f71f9c7",
    "CursorWrapper._execute_with_wrappers": "1f629e7adeb9d61b",
    "CursorWrapper._execute": "8a3a172b0a15ed53",
}
#: The Django series these methods were compared in (identical in both).
REVIEWED_SERIES = ("5.2", "6.1")


def _mirrored() -> dict[str, Any]:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.postgresql.base import DatabaseWrapper
    from django.db.backends.utils import CursorWrapper

    return {
        "BaseDatabaseWrapper.connect": BaseDatabaseWrapper.connect,
        "BaseDatabaseWrapper.set_autocommit": BaseDatabaseWrapper.set_autocommit,
        "BaseDatabaseWrapper._cursor": BaseDatabaseWrapper._cursor,
        "BaseDatabaseWrapper._prepare_cursor": BaseDatabaseWrapper._prepare_cursor,
        "BaseDatabaseWrapper.init_connection_state": BaseDatabaseWrapper.init_connection_state,
        "DatabaseWrapper.get_new_connection": DatabaseWrapper.get_new_connection,
        "DatabaseWrapper.init_connection_state": DatabaseWrapper.init_connection_state,
        "DatabaseWrapper._set_autocommit": DatabaseWrapper._set_autocommit,
        "CursorWrapper._execute_with_wrappers": CursorWrapper._execute_with_wrappers,
        "CursorWrapper._execute": CursorWrapper._execute,
    }


def _fingerprints(methods: dict[str, Any]) -> dict[str, str]:
    """Return a short hash of each method's source, by name."""
    return {
        name: hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]
        for name, method in methods.items()
    }


def test_the_django_methods_the_direct_road_follows_are_the_reviewed_ones() -> None:
    import django

    series = "{}.{}".format(*django.VERSION[:2])
    assert series in REVIEWED_SERIES
    assert _fingerprints(_mirrored()) == REVIEWED


def _psycopg_internals() -> dict[str, Any]:
    from psycopg._adapters_map import AdaptersMap
    from psycopg._cursor_base import BaseCursor
    from psycopg._typeinfo import TypesRegistry

    return {
        "AdaptersMap.__init__": AdaptersMap.__init__,
        "AdaptersMap.register_dumper": AdaptersMap.register_dumper,
        "AdaptersMap.register_loader": AdaptersMap.register_loader,
        "TypesRegistry.__init__": TypesRegistry.__init__,
        "TypesRegistry._ensure_own_state": TypesRegistry._ensure_own_state,
        "BaseCursor._reset": BaseCursor._reset,
        "BaseCursor._close": BaseCursor._close,
    }


#: psycopg's copy-on-write adapter tables (``_fastpath._shares_adapters``) and
#: cursor reset (a kept cursor's ``_reset()``), as reviewed in PSYCOPG_SERIES.
PSYCOPG_REVIEWED = {
    "AdaptersMap.__init__": "1f53ed5322f101a4",
    "AdaptersMap.register_dumper": "64b3db9558f9a9d6",
    "AdaptersMap.register_loader": "42d2f0c613d30676",
    "TypesRegistry.__init__": "6df592d454df6242",
    "TypesRegistry._ensure_own_state": "76ec9f2757a6a741",
    "BaseCursor._reset": "7340677757b4b4cc",
    "BaseCursor._close": "04e872b6b24efbcd",
}
PSYCOPG_SERIES = "3.3"


def test_the_psycopg_internals_the_hit_cursor_relies_on_are_the_reviewed_ones() -> None:
    assert psycopg.__version__.startswith(PSYCOPG_SERIES + ".")
    assert _fingerprints(_psycopg_internals()) == PSYCOPG_REVIEWED
