"""A primary and a real streaming replica behind a router (aliases from conftest).

The router sends writes to the primary and reads to the replica, except
inside a transaction on the primary, where reads must see the block's own
writes. The router reads ``connections["primary"].in_atomic_block``, which is
the calling task's own state: one task's transaction never redirects another
task's reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.db import DatabaseError, connections
from django.db.models.expressions import RawSQL

from django_async_db import async_atomic, async_connections
from tests.conftest import wait_until
from tests.testapp.models import Author

pytestmark = pytest.mark.usefixtures("replication", "read_only_db", "primary_replica_router")
READERS = 8  # the replica alias's pool has 10; this task holds one too


class PrimaryReplicaRouter:
    """Write to ``primary``; read from ``replica`` unless in a transaction on ``primary``."""

    def db_for_read(self, model: type, **hints: Any) -> str:
        return "primary" if connections["primary"].in_atomic_block else "replica"

    def db_for_write(self, model: type, **hints: Any) -> str:
        return "primary"

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True


@pytest.fixture
async def primary_replica_router(settings: Any) -> AsyncIterator[None]:
    settings.DATABASE_ROUTERS = [PrimaryReplicaRouter()]
    yield
    async with async_connections["primary"].cursor() as cur:
        await cur.execute("TRUNCATE testapp_author")
    assert await wait_until(_replica_empty, 10)


async def _replica_empty() -> bool:
    return not await Author.objects.using("replica").aexists()


def with_recovery() -> Any:
    """Authors annotated with ``pg_is_in_recovery()`` of the server that answers."""
    return Author.objects.annotate(in_recovery=RawSQL("pg_is_in_recovery()", ()))


async def replicated(name: str) -> bool:
    """Wait until the replica has the author ``name``."""
    return await wait_until(lambda: Author.objects.using("replica").filter(name=name).aexists(), 10)


async def test_writes_go_to_the_primary_and_reads_to_the_replica():
    ann = await Author.objects.acreate(name="ann")
    assert ann._state.db == "primary"
    async with async_connections["primary"].cursor() as cur:
        await cur.execute("SELECT pg_is_in_recovery(), count(*) FROM testapp_author")
        assert await cur.fetchone() == (False, 1)

    assert await replicated("ann")
    read = await with_recovery().aget(name="ann")
    assert read._state.db == "replica"
    assert read.in_recovery is True  # served by the standby
    assert read.pk == ann.pk
    assert [a.in_recovery async for a in with_recovery()] == [True]


async def test_the_replica_refuses_writes():
    with pytest.raises(DatabaseError, match="read-only transaction"):
        await Author.objects.using("replica").acreate(name="nope")


async def test_reads_inside_a_primary_transaction_see_its_own_writes():
    async with async_atomic("primary"):
        await Author.objects.acreate(name="bea")
        read = await with_recovery().aget(name="bea")
        assert read._state.db == "primary"
        assert read.in_recovery is False
        assert await Author.objects.filter(name="bea").acount() == 1

        async def other_task() -> list[tuple[str, bool]]:
            # Outside this transaction: routed to the replica, which cannot
            # have the uncommitted row (it has no row at all).
            return [(a.name, a.in_recovery) async for a in with_recovery()]

        assert await asyncio.create_task(other_task()) == []
        async with async_connections["replica"].cursor() as cur:
            await cur.execute("SELECT pg_is_in_recovery(), count(*) FROM testapp_author")
            assert await cur.fetchone() == (True, 0)
    assert await replicated("bea")


async def test_concurrent_reads_are_spread_on_replica_connections():
    await Author.objects.abulk_create([Author(name=f"r{n}") for n in range(5)])
    assert await replicated("r4")

    all_reading = asyncio.Barrier(READERS)

    async def read(n: int) -> tuple[bool, int]:
        author = await with_recovery().aget(name=f"r{n % 5}")
        await all_reading.wait()  # every task holds its replica connection now
        async with async_connections["replica"].cursor() as cur:
            await cur.execute("SELECT pg_backend_pid()")
            pid = (await cur.fetchone())[0]
        return author.in_recovery, pid

    results = await asyncio.gather(*(read(n) for n in range(READERS)))
    assert {recovering for recovering, _ in results} == {True}
    assert len({pid for _, pid in results}) == READERS  # one replica connection per task
