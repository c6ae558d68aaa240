"""Under ``ASGIHandler``, concurrent requests stay within the pool and give connections back."""

from __future__ import annotations

import asyncio

import pytest
from django.db import connections
from django.test import override_settings

from django_async_db.asgi import ASGIHandler
from tests.asgi.client import request
from tests.conftest import observer, wait_until

APPS = ["django_async_db", "tests.testapp"]
pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)

REQUESTS = 64
MIN_SIZE = 2
MAX_SIZE = 8


async def test_64_concurrent_requests_use_at_most_the_pools_connections(pool_option):
    pool_option({"min_size": MIN_SIZE, "max_size": MAX_SIZE, "timeout": 30, "max_idle": 0.2})
    dbname = connections.settings["default"]["NAME"]
    watch = await observer()
    # Sessions of this test run that are not the pool's (the test setup's sync connection).
    others = await _sessions(watch, dbname)
    app = ASGIHandler()
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await _sessions(watch, dbname) - others)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        with override_settings(ROOT_URLCONF="tests.asgi.urls", MIDDLEWARE=[]):
            responses = await asyncio.gather(*(request(app, "/slow/") for _ in range(REQUESTS)))
        done.set()
        await sampler
        assert [r.status for r in responses] == [200] * REQUESTS
        assert MIN_SIZE < peak <= MAX_SIZE  # the pool grew under load, never past its size

        async def back_to_min() -> bool:
            return await _sessions(watch, dbname) - others == MIN_SIZE

        assert await wait_until(back_to_min, seconds=10)
    finally:
        done.set()
        await watch.close()


async def _sessions(watch, dbname: str) -> int:
    cur = await watch.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = "
        "'client backend'",
        [dbname],
    )
    row = await cur.fetchone()
    return int(row[0])
