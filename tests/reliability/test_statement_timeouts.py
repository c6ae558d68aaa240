"""Statement timeouts (server settings and asyncio) cancel long queries on the server."""

from __future__ import annotations

import asyncio

import psycopg.errors
import pytest
from django.db import OperationalError

from django_async_db import async_atomic, async_connections
from tests.conftest import observer, wait_until
from tests.reliability.conftest import activity

pytestmark = pytest.mark.usefixtures("read_only_db")


async def run(sql: str) -> object:
    async with async_connections["default"].cursor() as cur:
        await cur.execute(sql)
        if cur.description is None:
            return None
        row = await cur.fetchone()
        return row[0] if row else None


async def no_sleep_running() -> bool:
    watch = await observer()
    try:
        return not [s for s in await activity(watch) if s[1] == "active" and "pg_sleep" in s[2]]
    finally:
        await watch.close()


async def test_statement_timeout_from_options(db_options) -> None:
    db_options["options"] = "-c statement_timeout=200"
    async with asyncio.timeout(30):
        assert await run("SHOW statement_timeout") == "200ms"
        with pytest.raises(OperationalError) as info:
            await run("SELECT pg_sleep(5)")
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        assert await run("SELECT 1") == 1  # the connection is still usable


async def test_set_local_statement_timeout_in_async_atomic() -> None:
    async with asyncio.timeout(30):

        async def block() -> None:
            async with async_atomic():
                await run("SET LOCAL statement_timeout = 200")
                await run("SELECT pg_sleep(5)")

        with pytest.raises(OperationalError) as info:
            await block()
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        assert not async_connections["default"].in_atomic_block
        assert await run("SHOW statement_timeout") == "0"  # SET LOCAL ended with the block
        assert await run("SELECT 1") == 1


async def test_asyncio_timeout_cancels_the_query_on_the_server() -> None:
    async with asyncio.timeout(30):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await run("SELECT pg_sleep(5)")
        assert await wait_until(no_sleep_running, 2.0), "pg_sleep still runs on the server"
        assert await run("SELECT 1") == 1
