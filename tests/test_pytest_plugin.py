"""The pytest plugin's fixtures (``async_db``, ``async_transactional_db`` ...).

Isolation checks rely on pytest keeping file order within pytest-django's
groups (``db`` tests first, then transactional ones).
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio
from django.db import connection, connections, transaction
from django.test.testcases import DatabaseOperationForbidden

from django_async_db import async_atomic, async_connections, pool_stats, run_sync
from tests.testapp.models import Author, Event

pytest_plugins = ["pytester"]

PID_SQL = "SELECT pg_backend_pid()"


async def async_pid(alias: str = "default") -> int:
    async with async_connections[alias].cursor() as cur:
        await cur.execute(PID_SQL)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def sync_author(async_db):
    """A row made by a sync fixture, in the test's transaction."""
    return Author.objects.create(name="sync fixture")


@pytest.fixture
def sync_pid(async_db):
    with connection.cursor() as cur:
        cur.execute(PID_SQL)
        return cur.fetchone()[0]


@pytest_asyncio.fixture
async def async_author(async_db):
    """A row made by an async fixture, in the test's transaction too."""
    return await Author.objects.acreate(name="async fixture")


# --- async_db ----------------------------------------------------------------------------


async def test_async_db_1_creates_a_row(async_db):
    await Author.objects.acreate(name="test 1")
    assert await Author.objects.filter(name="test 1").aexists()


async def test_async_db_2_row_of_previous_test_is_gone(async_db):
    assert await Author.objects.acount() == 0


async def test_async_db_sees_sync_and_async_fixture_rows(sync_author, async_author):
    assert (await Author.objects.aget(pk=sync_author.pk)).name == "sync fixture"
    assert (await Author.objects.aget(pk=async_author.pk)).name == "async fixture"
    assert await run_sync(Author.objects.count) == 2


async def test_async_db_uses_the_test_connection(sync_pid):
    assert await async_pid() == sync_pid
    assert await asyncio.create_task(async_pid()) == sync_pid
    assert async_connections["default"].in_atomic_block
    assert pool_stats("default") == {}


async def test_async_db_nested_async_atomic_is_a_savepoint(async_db):
    async with async_atomic():
        await Author.objects.acreate(name="kept")
        try:
            async with async_atomic():
                await Author.objects.acreate(name="rolled back")
                raise ValueError("roll the savepoint back")
        except ValueError:
            pass
    assert [a.name async for a in Author.objects.all()] == ["kept"]
    assert async_connections["default"].in_atomic_block  # the test's transaction


async def test_async_db_gather_shares_the_test_connection(async_db, sync_pid):
    async def work(i):
        await Event.objects.acreate(task=i, label="gather")
        return await async_pid()

    pids = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(10))), 30)
    assert set(pids) == {sync_pid}
    assert await Event.objects.acount() == 10


async def test_async_db_on_commit_is_not_run(async_db):
    ran = []
    async with async_atomic():
        await async_connections["default"].on_commit(lambda: ran.append(1))
    assert ran == []  # like db: the test's transaction never commits


def test_async_db_in_a_sync_test(async_db):
    assert Author.objects.count() == 0


@pytest.mark.django_db
async def test_django_db_mark_pins_too():
    await Author.objects.acreate(name="marked")
    assert await run_sync(Author.objects.filter(name="marked").count) == 1


@pytest.mark.django_db(databases=["default", "other"])
async def test_async_db_with_several_databases(async_db):
    await Author.objects.using("other").acreate(name="other")
    assert await Author.objects.using("other").acount() == 1
    assert await Author.objects.acount() == 0
    assert await async_pid("other") != await async_pid("default")


async def test_async_db_refuses_databases_it_was_not_given(async_db):
    with pytest.raises(DatabaseOperationForbidden, match="'other' are not allowed"):
        await Author.objects.using("other").acount()


async def test_no_fixture_no_database():
    with pytest.raises(RuntimeError, match="Database access not allowed"):
        await Author.objects.acount()


# --- async_assert_num_queries --------------------------------------------------------------


async def test_async_assert_num_queries(async_db, async_assert_num_queries):
    async with async_assert_num_queries(2) as captured:
        await Author.objects.acreate(name="a")
        await Author.objects.acount()
    assert "INSERT" in captured[0]["sql"]
    async with async_assert_num_queries(5, exact=False):
        await Author.objects.acount()


async def test_async_assert_num_queries_fails_with_the_queries(async_db, async_assert_num_queries):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)Expected to perform 2 .* but 1.*COUNT"):
        async with async_assert_num_queries(2):
            await Author.objects.acount()


# --- async_transactional_db ----------------------------------------------------------------


async def test_async_transactional_db_1_commits(async_transactional_db):
    async with async_atomic(durable=True):
        await Author.objects.acreate(name="committed")

    async def other_task():
        return await Author.objects.filter(name="committed").acount(), await async_pid()

    count, pid = await asyncio.create_task(other_task())
    assert count == 1
    assert pid != await async_pid()  # each task has its own connection


async def test_async_transactional_db_2_tables_were_flushed(async_transactional_db):
    assert await Author.objects.acount() == 0


async def test_async_transactional_db_runs_on_commit(async_transactional_db):
    ran = []

    async def callback():
        ran.append("async")
        await Event.objects.acreate(task=0, label="callback")

    async with async_atomic():
        await run_sync(transaction.on_commit, lambda: ran.append("sync"))
        await async_connections["default"].on_commit(callback)
        assert ran == []
    assert ran == ["sync", "async"]
    assert await Event.objects.filter(label="callback").acount() == 1


async def test_async_transactional_db_wins_over_async_db(async_db, async_transactional_db):
    assert not async_connections["default"].in_atomic_block


# --- a user's suite, in a fresh process ------------------------------------------------------


INNER_SUITE = """
import asyncio

import pytest
import pytest_asyncio

from django_async_db import async_atomic
from tests.testapp.models import Author


@pytest_asyncio.fixture
async def author(async_db):
    return await Author.objects.acreate(name="fixture")


@pytest.mark.asyncio
async def test_1_fixture_row_visible(author):
    assert (await Author.objects.aget(pk=author.pk)).name == "fixture"
    await Author.objects.acreate(name="test 1")


@pytest.mark.asyncio
async def test_2_rolled_back(async_db):
    assert await Author.objects.acount() == 0


@pytest.mark.asyncio
async def test_3_commits(async_transactional_db):
    async with async_atomic(durable=True):
        await Author.objects.acreate(name="committed")
    assert await asyncio.create_task(Author.objects.acount()) == 1


@pytest.mark.asyncio
async def test_4_flushed(async_transactional_db):
    assert await Author.objects.acount() == 0
"""


def test_plugin_in_a_users_suite(pytester, monkeypatch):
    """Entry-point registration, strict mode, function-scoped loops, a clean database drop."""
    pytester.makepyfile(test_inner=INNER_SUITE)
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            DJANGO_SETTINGS_MODULE = tests.settings
            asyncio_mode = strict
            asyncio_default_fixture_loop_scope = function
            """
        )
    )
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    )
    # Own database names: never those of the run this test is part of.
    monkeypatch.setenv("DJASYNC_RUN_ID", f"{os.environ['DJASYNC_RUN_ID']}i")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=120)
    result.assert_outcomes(passed=4)
    assert "error" not in result.stdout.str().lower()
    settings = connections.settings["default"]
    inner_db = f"test_djasync_{os.environ['DJASYNC_RUN_ID']}i"
    assert settings["TEST"]["NAME"] != inner_db
    assert not _database_exists(inner_db)


def _database_exists(name: str) -> bool:
    import psycopg

    params = connections["default"].get_connection_params()
    with psycopg.connect(
        dbname="postgres",
        **{k: params[k] for k in ("user", "password", "host", "port") if k in params},
        autocommit=True,
    ) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            is not None
        )
