"""Through PgBouncer in transaction pooling mode (alias ``"bouncer"``, see conftest).

A server session serves one transaction (or one autocommit statement) at a
time and then goes to another client, so nothing may rely on session state
across transactions: the connection is released between bridge calls
(``OPTIONS["release"] = "idle"``), statements are not prepared, ``SET`` is
``SET LOCAL`` inside a transaction, locks are transaction-scoped.
"""

from __future__ import annotations

import asyncio
import datetime
import time

import psycopg
import pytest
from django.db import OperationalError, connections
from django.utils import timezone

from django_async_db import async_atomic, async_connections, pool_stats
from tests.testapp.models import Account, Author, Book

from .conftest import APPS, BOUNCER_POOL, pgbouncer_show

B = "bouncer"
pytestmark = [
    # "bouncer" reaches the default alias's test database: flushed like it.
    pytest.mark.django_db(transaction=True, databases=["default", B], available_apps=APPS),
    pytest.mark.usefixtures("bouncer"),
]


async def execute(sql: str, params: list[object] | None = None) -> None:
    async with async_connections[B].cursor() as cur:
        await cur.execute(sql, params)


async def scalar(sql: str, params: list[object] | None = None) -> object:
    async with async_connections[B].cursor() as cur:
        await cur.execute(sql, params)
        row = await cur.fetchone()
        return row[0] if row else None


async def test_the_alias_goes_through_pgbouncer_in_transaction_mode(bouncer):
    assert await scalar("SELECT current_database()") == connections.settings["default"]["NAME"]
    pools = [p for p in pgbouncer_show(bouncer, "POOLS") if p["database"] != "pgbouncer"]
    assert {p["pool_mode"] for p in pools} == {"transaction"}
    assert connections.settings["default"]["NAME"] in {p["database"] for p in pools}


async def test_a_task_holds_its_connection_only_for_a_call_or_a_transaction():
    wrapper = connections[B]
    await Author.objects.using(B).acreate(name="ann")
    assert wrapper.connection is None  # given back right after the call
    async with async_atomic(B):
        await Author.objects.using(B).aget(name="ann")
        assert wrapper.connection is not None  # kept for the whole transaction
        await asyncio.sleep(0.01)
        assert wrapper.connection is not None
    assert wrapper.connection is None
    assert pool_stats(B)["in_use"] == 0


async def test_many_tasks_share_a_small_pool_between_their_calls():
    # 40 tasks, each doing several calls with waits between them, on a pool of
    # 4 connections: possible only because a task holds none while it waits.
    in_use: list[int] = []

    async def worker(n: int) -> None:
        await Author.objects.using(B).acreate(name=f"a{n}")
        await asyncio.sleep(0.02)
        in_use.append(pool_stats(B)["in_use"])
        async with async_atomic(B):
            author = await Author.objects.using(B).aget(name=f"a{n}")
            await Book.objects.using(B).acreate(title=f"b{n}", author=author)
        await asyncio.sleep(0.02)
        assert await Book.objects.using(B).filter(author__name=f"a{n}").acount() == 1

    await asyncio.gather(*(worker(n) for n in range(40)))
    assert await Book.objects.using(B).acount() == 40
    assert max(in_use) <= BOUNCER_POOL["max_size"]
    assert pool_stats(B)["timeouts"] == 0


async def test_django_time_zone_holds_whatever_other_clients_set(bouncer):
    # Another client of the same PgBouncer pool changes its session time zone;
    # PgBouncer keeps each client's TimeZone (it tracks it) on every server
    # session it lends, so Django's UTC connection setting holds.
    url = bouncer.url(connections.settings["default"]["NAME"])
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SET TIME ZONE 'Asia/Tokyo'")
        assert other.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        zones = await asyncio.gather(*(scalar("SHOW TimeZone") for _ in range(12)))
        assert set(zones) == {"UTC"}
        assert other.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)

    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    author = await Author.objects.using(B).acreate(name="tz")
    book = await Book.objects.using(B).acreate(title="tz", author=author, published=when)
    assert (await Book.objects.using(B).aget(pk=book.pk)).published == when
    # Django extracts in the current time zone (TIME_ZONE) from UTC stored values.
    hour = timezone.localtime(when).hour
    assert await Book.objects.using(B).filter(published__hour=hour).acount() == 1


async def test_repeated_queries_are_not_prepared_server_side():
    await Author.objects.using(B).acreate(name="p")
    async with async_atomic(B):  # one server session for the whole block
        for _ in range(10):  # twice psycopg's default prepare_threshold
            await Author.objects.using(B).filter(name="p").aexists()
        assert await scalar("SELECT count(*) FROM pg_prepared_statements") == 0
    # And the same query shape from many tasks, on whatever session each gets.
    results = await asyncio.gather(
        *(Author.objects.using(B).filter(name="p").aexists() for _ in range(30))
    )
    assert all(results)


async def test_set_local_is_scoped_to_the_transaction():
    async def timed_out() -> None:
        async with async_atomic(B):
            await execute("SET LOCAL statement_timeout = '50ms'")
            await scalar("SELECT pg_sleep(1)")

    with pytest.raises(OperationalError, match="statement timeout"):
        await timed_out()
    # No session of the pool kept it: every later transaction sees the default.
    timeouts = await asyncio.gather(*(scalar("SHOW statement_timeout") for _ in range(8)))
    assert set(timeouts) == {"0"}


async def test_transaction_scoped_advisory_locks_serialize_tasks():
    account = await Account.objects.using(B).acreate(name="counter", balance=0)

    async def increment() -> None:
        async with async_atomic(B):
            await scalar("SELECT pg_advisory_xact_lock(%s)", [account.pk])
            row = await Account.objects.using(B).aget(pk=account.pk)
            await asyncio.sleep(0.005)  # a lost update without the lock
            row.balance += 1
            await row.asave(update_fields=["balance"])

    await asyncio.gather(*(increment() for _ in range(12)))
    await account.arefresh_from_db()
    assert account.balance == 12


async def test_a_timeout_cancels_the_query_through_pgbouncer():
    async def block() -> None:
        async with asyncio.timeout(0.3), async_atomic(B):
            await Author.objects.using(B).acreate(name="rolled back")
            await scalar("SELECT pg_sleep(5)")

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await block()
    assert time.monotonic() - start < 3
    # Seen on the server directly: the sleep is gone, the row was rolled back.
    async with async_connections["default"].cursor() as cur:
        await cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND state = 'active'",
            ["SELECT pg_sleep(5)%"],
        )
        assert (await cur.fetchone())[0] == 0
    assert await Author.objects.using(B).acount() == 0
    assert await scalar("SELECT 1") == 1


async def test_streaming_uses_client_side_chunks():
    await Author.objects.using(B).abulk_create([Author(name=f"s{n:03}") for n in range(250)])
    names = [a.name async for a in Author.objects.using(B).order_by("name").aiterator(100)]
    assert names == [f"s{n:03}" for n in range(250)]
