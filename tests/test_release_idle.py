"""OPTIONS["release"] = "idle": connections held only for one bridge call or one transaction."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_async_db import async_atomic, async_connections, pool_stats
from tests.conftest import wait_until
from tests.testapp.models import Author

APPS = ["django_async_db", "tests.testapp"]
pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)


@pytest.fixture
def idle_release(db_options):
    """Put the default alias in idle-release mode (with server-side cursors off)."""
    db_options["release"] = "idle"
    db_options["pool"] = {"min_size": 1, "max_size": 2, "timeout": 5}
    connections.settings["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True


async def backend_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_connection_goes_back_after_each_query(idle_release):
    await Author.objects.acreate(name="a")
    wrapper = async_connections["default"].wrapper
    assert wrapper.connection is None
    assert await Author.objects.acount() == 1
    assert wrapper.connection is None

    async def all_available() -> bool:
        stats = pool_stats("default")
        return bool(stats["pool_available"] == stats["pool_size"])

    # Nothing holds a connection although this task is still running.
    assert await wait_until(all_available)


async def test_a_transaction_keeps_its_connection_across_awaits(idle_release):
    wrapper = async_connections["default"].wrapper
    async with async_atomic():
        first = await backend_pid()
        await Author.objects.acreate(name="in tx")
        assert wrapper.connection is not None  # held: the transaction is open
        assert await backend_pid() == first
    assert wrapper.connection is None  # given back once the block committed
    assert await Author.objects.filter(name="in tx").aexists()


async def test_a_rolled_back_transaction_releases_a_clean_connection(idle_release):
    async def fail_in_transaction() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="gone")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail_in_transaction()
    assert async_connections["default"].wrapper.connection is None
    assert not await Author.objects.filter(name="gone").aexists()


async def test_an_async_cursor_survives_releases_between_statements(idle_release):
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        await cur.execute("SELECT 2")  # runs on whichever connection is free now
        assert await cur.fetchone() == (2,)


async def test_more_tasks_than_connections_share_the_pool(idle_release):
    import asyncio

    async def work(i: int) -> int:
        await Author.objects.acreate(name=f"t{i}")
        return await Author.objects.acount()

    # 20 tasks on a pool of 2 connections, none waiting for a task to end.
    await asyncio.gather(*(work(i) for i in range(20)))
    assert await Author.objects.acount() == 20


def test_idle_release_needs_server_side_cursors_off(settings):
    wrapper_class = type(connections["default"])
    settings_dict = {
        **connections.settings["default"],
        "OPTIONS": {"release": "idle"},
        "DISABLE_SERVER_SIDE_CURSORS": False,
    }
    with pytest.raises(ImproperlyConfigured, match="DISABLE_SERVER_SIDE_CURSORS"):
        wrapper_class(settings_dict, alias="default")


def test_unknown_release_mode_is_refused():
    wrapper_class = type(connections["default"])
    settings_dict = {**connections.settings["default"], "OPTIONS": {"release": "sometimes"}}
    with pytest.raises(ImproperlyConfigured, match="'task' or 'idle'"):
        wrapper_class(settings_dict, alias="default")
