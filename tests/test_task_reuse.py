"""A finished task's clean wrapper and connection go to the loop's next task."""

from __future__ import annotations

import asyncio

import pytest
from django.db import ProgrammingError, connections
from django.test import override_settings

from django_async_db import (
    PoolTimeout,
    _pool,
    async_atomic,
    async_connections,
    pool_stats,
    run_sync,
)
from tests.conftest import observer, wait_until
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


def wrapper_and_pid() -> tuple[object, int]:
    wrapper = connections["default"]
    with wrapper.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return wrapper, cur.fetchone()[0]


async def in_new_task() -> tuple[object, int]:
    got = await asyncio.create_task(run_sync(wrapper_and_pid))
    await asyncio.sleep(0)  # the task's done callbacks (the release among them) run now
    return got


async def test_the_next_task_takes_the_finished_tasks_wrapper_and_connection(pool_option):
    pool_option({"min_size": 1, "max_size": 4})
    first_wrapper, first_pid = await in_new_task()
    assert pool_stats("default")["connections_parked"] == 1
    requests = pool_stats("default").get("requests_num", 0)
    second_wrapper, second_pid = await in_new_task()
    assert (second_wrapper, second_pid) == (first_wrapper, first_pid)
    # Not checked out of psycopg_pool again.
    assert pool_stats("default").get("requests_num", 0) == requests


async def test_tasks_running_together_never_share_a_wrapper(pool_option):
    pool_option({"min_size": 1, "max_size": 8})
    await asyncio.gather(*(in_new_task() for _ in range(8)))  # park several
    gate = asyncio.Event()
    got: list[tuple[object, int]] = []

    async def hold() -> None:
        got.append(await run_sync(wrapper_and_pid))
        await gate.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(6)]

    async def all_got() -> bool:
        return len(got) == 6

    try:
        # All six hold a connection at once (the pool can open eight).
        assert await wait_until(all_got, seconds=10)
    finally:
        gate.set()
        await asyncio.gather(*tasks)
    assert len({id(w) for w, _ in got}) == 6
    assert len({pid for _, pid in got}) == 6


async def test_a_parked_connection_goes_back_to_the_pool_when_no_task_takes_it(
    pool_option, monkeypatch
):
    monkeypatch.setattr(_pool, "PARK_SECONDS", 0.05)
    pool_option({"min_size": 1, "max_size": 4})
    await in_new_task()
    assert pool_stats("default")["connections_parked"] == 1

    async def unparked() -> bool:
        stats = pool_stats("default")
        return stats["connections_parked"] == 0 and stats["pool_available"] >= 1

    assert await wait_until(unparked, seconds=3)


async def test_a_task_that_saw_a_database_error_leaves_no_wrapper(pool_option):
    pool_option({"min_size": 1, "max_size": 4})

    def fail() -> object:
        # Not an IntegrityError or DataError: Django marks the connection suspect.
        with pytest.raises(ProgrammingError), connections["default"].cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
        return connections["default"]

    failed = await asyncio.create_task(run_sync(fail))
    await asyncio.sleep(0)
    assert pool_stats("default")["connections_parked"] == 0
    wrapper, _ = await in_new_task()
    assert wrapper is not failed


async def test_a_task_ending_with_a_pending_execute_wrapper_leaves_no_wrapper(pool_option):
    pool_option({"min_size": 1, "max_size": 4})

    async def leave_wrapper() -> object:
        connections["default"].execute_wrappers.append(lambda ex, *a: ex(*a))
        await Author.objects.acount()
        return connections["default"]

    left = await asyncio.create_task(leave_wrapper())
    await asyncio.sleep(0)
    wrapper, _ = await in_new_task()
    assert wrapper is not left


async def test_the_next_task_starts_with_an_empty_query_log(pool_option):
    pool_option({"min_size": 1, "max_size": 4})

    async def logged() -> int:
        conn = connections["default"]
        conn.force_debug_cursor = True
        await Author.objects.acount()
        conn.force_debug_cursor = False
        return len(conn.queries_log)

    assert await asyncio.create_task(logged()) == 1
    await asyncio.sleep(0)

    async def fresh() -> tuple[object, int]:
        return connections["default"], len(connections["default"].queries_log)

    _, logged_now = await asyncio.create_task(fresh())
    assert logged_now == 0


async def test_a_setting_change_makes_parked_wrappers_stale(pool_option):
    pool_option({"min_size": 1, "max_size": 4})
    first, _ = await in_new_task()
    with override_settings(TIME_ZONE="Asia/Tokyo"):
        second, _ = await in_new_task()
    assert second is not first


async def test_tasks_waiting_for_a_connection_get_the_released_ones(pool_option):
    pool_option({"min_size": 1, "max_size": 2, "timeout": 10})

    async def short() -> int:
        await asyncio.sleep(0)
        return await Author.objects.acount()

    assert await asyncio.gather(*(asyncio.create_task(short()) for _ in range(50))) == [0] * 50
    assert pool_stats("default")["pool_size"] <= 2


async def test_a_transaction_commits_on_a_reused_wrapper(pool_option):
    pool_option({"min_size": 1, "max_size": 4})
    await in_new_task()

    async def write() -> object:
        async with async_atomic():
            await Author.objects.acreate(name="Ann")
        return connections["default"]

    await asyncio.create_task(write())
    assert await Author.objects.filter(name="Ann").aexists()


async def test_health_checks_turn_parking_off(db_options):
    connections.settings["default"]["CONN_HEALTH_CHECKS"] = True
    db_options["pool"] = {"min_size": 1, "max_size": 4}
    await in_new_task()
    assert pool_stats("default")["connections_parked"] == 0


async def test_closing_the_pools_closes_parked_connections(pool_option):
    pool_option({"min_size": 0, "max_size": 4})
    _, pid = await in_new_task()
    assert pool_stats("default")["connections_parked"] == 1
    await async_connections.close_all()
    watch = await observer()
    try:

        async def gone() -> bool:
            cur = await watch.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
            return await cur.fetchone() is None

        assert await wait_until(gone, seconds=5)
    finally:
        await watch.close()


async def test_a_long_holder_does_not_make_new_tasks_wait_while_the_pool_can_grow(pool_option):
    pool_option({"min_size": 1, "max_size": 4, "timeout": 10})
    release = asyncio.Event()

    async def hold() -> None:
        await run_sync(wrapper_and_pid)
        await release.wait()

    holder = asyncio.create_task(hold())
    try:
        others = await asyncio.wait_for(
            asyncio.gather(*(asyncio.create_task(run_sync(wrapper_and_pid)) for _ in range(3))),
            timeout=5,
        )
        assert len({pid for _, pid in others}) >= 1
    finally:
        release.set()
        await holder


async def test_cancelled_waiters_leave_every_connection_to_the_pool(pool_option):
    pool_option({"min_size": 2, "max_size": 2, "timeout": 10})
    release = asyncio.Event()

    async def hold() -> None:
        await run_sync(wrapper_and_pid)
        await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0.1)
    waiters = [asyncio.create_task(run_sync(wrapper_and_pid)) for _ in range(5)]
    await asyncio.sleep(0.1)
    for waiter in waiters[:3]:
        waiter.cancel()
    release.set()
    await asyncio.gather(*holders)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results[:3]] == [asyncio.CancelledError] * 3
    assert all(isinstance(r, tuple) for r in results[3:])
    await asyncio.sleep(0)
    pool = _pool._pools[asyncio.get_running_loop()]["default"]
    assert pool.checked_out == 0
    assert pool_stats("default")["pool_available"] == 2


async def test_waiting_for_a_held_connection_times_out_with_pool_timeout(pool_option):
    pool_option({"min_size": 1, "max_size": 1, "timeout": 0.3})
    release = asyncio.Event()

    async def hold() -> None:
        await run_sync(wrapper_and_pid)
        await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.1)
    try:
        with pytest.raises(PoolTimeout, match="all 1 connections of its pool are in use"):
            await asyncio.create_task(run_sync(wrapper_and_pid))
        assert pool_stats("default")["timeouts"] >= 1
    finally:
        release.set()
        await holder


async def test_a_connection_past_max_lifetime_is_not_passed_on(pool_option):
    """Tasks back to back never return the connection to psycopg_pool: its age still counts."""
    pool_option({"min_size": 1, "max_size": 2, "max_lifetime": 0.6})
    _, first_pid = await in_new_task()
    pids = {first_pid}
    deadline = asyncio.get_running_loop().time() + 2.0
    while asyncio.get_running_loop().time() < deadline:
        pids.add((await in_new_task())[1])
        await asyncio.sleep(0.05)  # steady traffic: always reused within PARK_SECONDS
    # psycopg_pool replaces an expired connection when it comes back: with
    # parking, that must still happen (a 0.6 s lifetime over 2 s: new sessions).
    assert len(pids) >= 2
