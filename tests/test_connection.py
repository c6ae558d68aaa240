"""async_connections and AsyncCursor: the task's own connection, with async methods."""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import (
    DataError,
    IntegrityError,
    ProgrammingError,
    connection,
    connections,
)
from django.utils.connection import ConnectionDoesNotExist

from django_async_db import (
    AsyncConnection,
    AsyncCursor,
    async_atomic,
    async_connections,
    run_sync,
)
from tests.testapp.models import Author, Tag

# Real commits, each task on its own pooled connection. Only the test app's
# tables are flushed afterwards (available_apps), which keeps the teardown fast.
APPS = ["django_async_db", "tests.testapp"]
pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)


async def backend_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        return (await cur.fetchone())[0]


# AsyncCursor


async def test_execute_with_parameters_and_fetchone():
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT %s::int + 1, %s::text", [41, "x"])
        assert await cur.fetchone() == (42, "x")
        assert await cur.fetchone() is None


async def test_named_parameters():
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT %(a)s::int * %(b)s::int", {"a": 6, "b": 7})
        assert await cur.fetchone() == (42,)


async def test_parameters_are_never_formatted_into_the_sql():
    evil = "x'); DROP TABLE testapp_tag; --"
    async with async_connections["default"].cursor() as cur:
        await cur.execute("INSERT INTO testapp_tag (name) VALUES (%s)", [evil])
    assert await Tag.objects.filter(name=evil).aexists()


async def test_fetchmany_and_fetchall():
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT generate_series(1, 10)")
        assert await cur.fetchmany(3) == [(1,), (2,), (3,)]
        assert await cur.fetchmany() == [(4,)]  # arraysize rows (1)
        assert await cur.fetchall() == [(n,) for n in range(5, 11)]
        assert await cur.fetchall() == []


async def test_async_for_iterates_the_rows():
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT n, n * n FROM generate_series(1, 5) AS n")
        rows = [row async for row in cur]
    assert rows == [(n, n * n) for n in range(1, 6)]


async def test_executemany_and_rowcount():
    async with async_connections["default"].cursor() as cur:
        await cur.executemany(
            "INSERT INTO testapp_tag (name) VALUES (%s)", [["a"], ["b"], ["c"], ["d"]]
        )
        assert cur.rowcount == 4
        await cur.execute("UPDATE testapp_tag SET name = upper(name) WHERE name IN ('a', 'b')")
        assert cur.rowcount == 2
        await cur.execute("SELECT name FROM testapp_tag ORDER BY name")
        assert cur.rowcount == 4
        assert await cur.fetchall() == [("A",), ("B",), ("c",), ("d",)]
    assert await Tag.objects.acount() == 4


async def test_description_names_the_columns():
    cur = async_connections["default"].cursor()
    assert cur.description is None
    assert cur.rowcount == -1
    async with cur:
        await cur.execute("SELECT 1 AS one, 'two' AS two")
        assert [col.name for col in cur.description] == ["one", "two"]
        assert [col[0] for col in cur.description] == ["one", "two"]


async def test_fetch_before_execute_is_an_error():
    cur = async_connections["default"].cursor()
    with pytest.raises(ProgrammingError, match="execute"):
        await cur.fetchone()


async def test_cursor_context_closes_the_cursor_not_the_connection():
    conn = async_connections["default"]
    async with conn.cursor() as cur:
        await cur.execute("SELECT 1")
        inner = cur._cursor
    assert inner.closed
    assert conn.wrapper.connection is not None
    assert not conn.wrapper.connection.closed


async def test_djangos_adapters_apply_to_raw_queries():
    moment = datetime.datetime(
        2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT %s::timestamptz, %s::jsonb IS NULL", [moment, None])
        value, is_null = await cur.fetchone()
    assert value == moment
    assert value.utcoffset() == datetime.timedelta(0)  # USE_TZ: aware, in UTC
    assert is_null is True


async def test_sql_errors_map_to_djangos_exception_classes():
    async with async_connections["default"].cursor() as cur:
        with pytest.raises(ProgrammingError):
            await cur.execute("SELEC 1")
        with pytest.raises(DataError):
            await cur.execute("SELECT 1 / 0")
        await cur.execute("INSERT INTO testapp_tag (name) VALUES ('x')")
        with pytest.raises(IntegrityError):
            await cur.execute("INSERT INTO testapp_tag (name) VALUES ('x')")
        # Autocommit: every failed statement rolled back alone; the connection works.
        await cur.execute("SELECT count(*) FROM testapp_tag")
        assert await cur.fetchone() == (1,)


# The facade: one connection per task, shared by raw SQL and the ORM


async def test_cursor_and_orm_share_the_tasks_connection_and_transaction():
    pid = await backend_pid()

    def sync_pid() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]

    assert await run_sync(sync_pid) == pid
    async with async_atomic():
        async with async_connections["default"].cursor() as cur:
            await cur.execute("INSERT INTO testapp_author (name, bio) VALUES ('raw', '')")
        assert await Author.objects.filter(name="raw").aexists()  # same transaction
        assert await run_sync(sync_pid) == pid
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT count(*) FROM testapp_author")
            assert await cur.fetchone() == (1,)


async def test_the_facade_keeps_no_state_of_its_own():
    first = async_connections["default"]
    second = async_connections["default"]
    assert isinstance(first, AsyncConnection)
    assert isinstance(first.cursor(), AsyncCursor)
    assert first.wrapper is second.wrapper is connections["default"]
    assert first.alias == "default"
    async with async_atomic():
        assert first.in_atomic_block
        assert second.in_atomic_block
        assert not first.get_autocommit()
    assert first.get_autocommit()


async def test_each_task_has_its_own_connection():
    parent = await backend_pid()

    all_connected = asyncio.Barrier(3)

    async def child() -> tuple[object, int]:
        pid = await backend_pid()
        await all_connected.wait()  # hold the connection until every child has one
        return async_connections["default"].wrapper, pid

    results = await asyncio.gather(*(child() for _ in range(3)))
    wrappers = {id(w) for w, _ in results}
    pids = {pid for _, pid in results}
    assert len(wrappers) == 3
    assert async_connections["default"].wrapper not in [w for w, _ in results]
    assert parent not in pids
    assert len(pids) == 3


async def test_ensure_connection_and_close():
    conn = async_connections["default"]
    await conn.close()
    assert conn.wrapper.connection is None
    await conn.ensure_connection()
    assert conn.wrapper.connection is not None
    await conn.close()
    assert conn.wrapper.connection is None
    assert await backend_pid() > 0  # reconnects on the next query


async def test_unknown_alias_is_djangos_error():
    with pytest.raises(ConnectionDoesNotExist):
        async_connections["no_such_alias"]


@pytest.fixture
def sqlite_alias():
    """Add an alias on another ENGINE for one test, then remove it."""
    alias = "sqlite_elsewhere"
    connections.settings[alias] = connections.configure_settings(
        {"default": {}, alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    )[alias]
    try:
        yield alias
    finally:
        with contextlib.suppress(AttributeError):  # never created
            del connections[alias]
        del connections.settings[alias]


async def test_alias_on_another_engine_is_a_clear_error(sqlite_alias):
    await Author.objects.acount()  # the ORM is set up before the alias appears
    with pytest.raises(ImproperlyConfigured) as info:
        async_connections[sqlite_alias]
    message = str(info.value)
    assert repr(sqlite_alias) in message
    assert "django.db.backends.sqlite3" in message
    assert "django_async_db.backends.postgresql" in message
    with pytest.raises(ImproperlyConfigured, match=sqlite_alias):
        async with async_atomic(using=sqlite_alias):
            pass
    assert sqlite_alias not in list(async_connections)
    assert set(async_connections) == {"default", "other"}
