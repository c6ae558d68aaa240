"""Pool settings per alias, and the pool metrics exposed for monitoring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from django.db import connections

from django_async_db import PoolTimeout, all_pool_stats, async_atomic, async_connections, pool_stats
from tests.conftest import wait_until

from .conftest import ALIASES, APPS

pytestmark = pytest.mark.django_db(transaction=True, databases=ALIASES, available_apps=APPS)

OTHER_POOL = {"min_size": 1, "max_size": 3, "timeout": 0.5}


@pytest.fixture
async def small_other_pool() -> AsyncIterator[None]:
    """Give the ``other`` alias its own, small pool for one test (fresh pools around it)."""
    options = connections.settings["other"]["OPTIONS"]
    saved = options.get("pool")
    await async_connections.close_all()
    options["pool"] = dict(OTHER_POOL)
    yield
    options["pool"] = saved
    await async_connections.close_all()


async def select_one(alias: str) -> None:
    async with async_connections[alias].cursor() as cur:
        await cur.execute("SELECT 1")


@pytest.mark.usefixtures("small_other_pool")
async def test_each_alias_has_its_own_pool_settings():
    await asyncio.gather(asyncio.create_task(select_one("default")), select_one("other"))
    default, other = pool_stats("default"), pool_stats("other")
    assert default["pool_max"] == connections.settings["default"]["OPTIONS"]["pool"]["max_size"]
    assert (other["pool_min"], other["pool_max"], other["pool_timeout"]) == (1, 3, 0.5)
    assert default["alias"] == "default"
    assert other["alias"] == "other"
    assert all_pool_stats() == {"default": default, "other": other} | all_pool_stats()
    assert {"default", "other"} <= all_pool_stats().keys()


@pytest.mark.usefixtures("small_other_pool")
async def test_metrics_count_in_use_waiting_and_timeouts():
    release = asyncio.Event()
    holding = 0

    async def hold() -> None:
        nonlocal holding
        async with async_atomic("other"):
            await select_one("other")
            holding += 1
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(3)]
    assert await wait_until(lambda: asyncio.sleep(0, holding == 3))
    stats = pool_stats("other")
    assert stats["in_use"] == 3
    assert stats["pool_available"] == 0
    assert stats["requests_waiting"] == 0
    assert stats["timeouts"] == 0

    late = asyncio.create_task(select_one("other"))
    assert await wait_until(lambda: asyncio.sleep(0, pool_stats("other")["requests_waiting"] == 1))
    with pytest.raises(PoolTimeout):
        await late
    stats = pool_stats("other")
    assert stats["requests_waiting"] == 0
    assert stats["timeouts"] == 1

    release.set()
    await asyncio.gather(*holders)
    assert await wait_until(lambda: asyncio.sleep(0, pool_stats("other")["in_use"] == 0))
    assert pool_stats("other")["pool_available"] == 3
    assert pool_stats("default").get("timeouts", 0) == 0


async def test_an_alias_not_used_on_this_loop_has_no_stats():
    await async_connections.close_all()
    assert pool_stats("other") == {}
    assert "other" not in all_pool_stats()
