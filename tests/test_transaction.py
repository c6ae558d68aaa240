"""async_atomic: Django's atomic() semantics for async code, spanning awaits."""

from __future__ import annotations

import asyncio
import logging

import pytest
from django.db import IntegrityError, OperationalError, transaction
from django.db.transaction import TransactionManagementError

from django_async_db import AsyncAtomic, async_atomic, async_connections, run_sync
from tests.testapp.models import Account, Author, Tag

# Real commits, each task on its own pooled connection. Only the test app's
# tables are flushed afterwards (available_apps), which keeps the teardown fast.
APPS = ["django_async_db", "tests.testapp"]
pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)


class Boom(Exception):
    """Raised inside a block to roll it back."""


async def in_other_task(coro_fn):
    """Run ``coro_fn()`` in a child task: its own connection, outside our transaction."""
    return await asyncio.create_task(coro_fn())


async def committed_names() -> list[str]:
    async def names() -> list[str]:
        return [a.name async for a in Author.objects.order_by("name")]

    return await in_other_task(names)


async def txid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT txid_current()")
        return (await cur.fetchone())[0]


async def test_block_commits_on_exit_and_not_before():
    async with async_atomic():
        await Author.objects.acreate(name="Ann")
        assert await committed_names() == []  # not visible outside the transaction yet
    assert await committed_names() == ["Ann"]


async def test_block_spans_awaits_in_one_transaction():
    async with async_atomic():
        first = await txid()
        await asyncio.sleep(0.01)
        await Author.objects.acreate(name="Ann")
        await asyncio.sleep(0)
        assert await txid() == first
        assert await run_sync(lambda: Author.objects.count()) == 1
        assert await txid() == first
    assert await txid() != first


async def test_exception_rolls_back_and_propagates():
    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="Ann")
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await committed_names() == []
    assert not async_connections["default"].in_atomic_block
    assert async_connections["default"].get_autocommit()


async def test_inner_savepoint_rollback_keeps_outer_work():
    async def inner() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="inner")
            raise Boom

    async with async_atomic():
        await Author.objects.acreate(name="outer")
        with pytest.raises(Boom):
            await inner()
        await Author.objects.acreate(name="outer again")
    assert await committed_names() == ["outer", "outer again"]


async def test_outer_rollback_discards_released_savepoints():
    async def block() -> None:
        async with async_atomic():
            async with async_atomic():
                await Author.objects.acreate(name="inner")
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await committed_names() == []


async def test_sync_atomic_inside_run_sync_nests_as_a_savepoint():
    def sync_part() -> None:
        with transaction.atomic():
            Author.objects.create(name="kept")
        try:
            with transaction.atomic():
                Author.objects.create(name="dropped")
                raise Boom
        except Boom:
            pass
        assert transaction.get_connection().in_atomic_block

    async with async_atomic():
        await run_sync(sync_part)
    assert await committed_names() == ["kept"]


async def test_savepoint_false_error_marks_the_whole_block_for_rollback():
    async def inner() -> None:
        async with async_atomic(savepoint=False):
            raise Boom

    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="Ann")
            with pytest.raises(Boom):
                await inner()
            assert async_connections["default"].get_rollback()
            await Author.objects.acount()  # Django refuses queries in a broken block

    with pytest.raises(TransactionManagementError):
        await block()
    assert await committed_names() == []


async def test_set_rollback_rolls_back_without_an_exception():
    conn = async_connections["default"]
    async with async_atomic():
        await Author.objects.acreate(name="Ann")
        assert conn.get_rollback() is False
        conn.set_rollback(True)
        assert conn.get_rollback() is True
    assert await committed_names() == []


async def test_set_rollback_in_a_savepoint_rolls_back_only_the_savepoint():
    conn = async_connections["default"]
    async with async_atomic():
        await Author.objects.acreate(name="Ann")
        async with async_atomic():
            await Author.objects.acreate(name="in savepoint")
            conn.set_rollback(True)
        assert conn.get_rollback() is False
        await Author.objects.acreate(name="Bob")
    assert await committed_names() == ["Ann", "Bob"]


async def test_rollback_flag_outside_a_block_is_an_error():
    conn = async_connections["default"]
    with pytest.raises(TransactionManagementError):
        conn.get_rollback()
    with pytest.raises(TransactionManagementError):
        conn.set_rollback(True)


async def test_integrity_error_is_djangos_and_savepoint_keeps_transaction_usable():
    await Tag.objects.acreate(name="python")
    with pytest.raises(IntegrityError):
        await Tag.objects.acreate(name="python")  # autocommit: the connection stays usable
    async with async_atomic():
        await Author.objects.acreate(name="before")
        with pytest.raises(IntegrityError) as info:
            async with async_atomic():
                await Tag.objects.acreate(name="python")
        assert info.value.__cause__.sqlstate == "23505"  # unique_violation, from psycopg
        await Author.objects.acreate(name="after")
        assert await Tag.objects.acount() == 1
    assert await committed_names() == ["after", "before"]


async def test_on_commit_runs_sync_and_async_callbacks_in_order_after_commit():
    calls: list[tuple[str, list[str]]] = []

    def sync_cb() -> None:
        calls.append(("sync", []))

    async def async_cb() -> None:
        # Runs after COMMIT: the row is visible from another connection.
        calls.append(("async", await committed_names()))
        await Author.objects.acreate(name="from callback")

    conn = async_connections["default"]
    async with async_atomic():
        await Author.objects.acreate(name="Ann")
        await conn.on_commit(sync_cb)
        await conn.on_commit(async_cb)
        await conn.on_commit(lambda: calls.append(("lambda", [])))
        assert calls == []
    assert calls == [("sync", []), ("async", ["Ann"]), ("lambda", [])]
    assert await committed_names() == ["Ann", "from callback"]


async def test_on_commit_callbacks_are_dropped_on_rollback():
    calls: list[str] = []

    async def async_cb() -> None:
        calls.append("async")

    conn = async_connections["default"]

    async def block(label: str) -> None:
        async with async_atomic():
            await conn.on_commit(lambda: calls.append(label))
            await conn.on_commit(async_cb)
            raise Boom

    with pytest.raises(Boom):
        await block("rolled back")
    async with async_atomic():
        with pytest.raises(Boom):
            await block("savepoint")  # nested: a savepoint rolled back
        await conn.on_commit(lambda: calls.append("outer"))
    assert calls == ["outer"]


async def test_on_commit_outside_a_block_runs_at_once():
    calls: list[str] = []

    async def async_cb() -> None:
        calls.append("async")

    await async_connections["default"].on_commit(async_cb)
    assert calls == ["async"]


async def test_robust_on_commit_callback_failure_is_logged_and_others_run(caplog):
    calls: list[str] = []

    async def failing() -> None:
        raise Boom("callback failed")

    conn = async_connections["default"]
    with caplog.at_level(logging.ERROR, logger="django.db.backends.base"):
        async with async_atomic():
            await conn.on_commit(failing, robust=True)
            await conn.on_commit(lambda: calls.append("after"))
    assert calls == ["after"]
    assert any("on_commit" in r.getMessage() for r in caplog.records)


async def test_django_on_commit_inside_run_sync_joins_the_async_block():
    calls: list[str] = []
    async with async_atomic():
        await run_sync(transaction.on_commit, lambda: calls.append("django"))
        assert calls == []
    assert calls == ["django"]


@async_atomic
async def create_then_maybe_fail(name: str, fail: bool = False) -> Author:
    """Create an author in a transaction (decorator form without arguments)."""
    author = await Author.objects.acreate(name=name)
    if fail:
        raise Boom
    return author


@async_atomic(using="default")
async def create_with_alias(name: str) -> bool:
    await Author.objects.acreate(name=name)
    return async_connections["default"].in_atomic_block


async def test_decorator_without_arguments():
    author = await create_then_maybe_fail("Ann")
    assert author.pk is not None
    with pytest.raises(Boom):
        await create_then_maybe_fail("Bob", fail=True)
    assert await committed_names() == ["Ann"]
    assert create_then_maybe_fail.__name__ == "create_then_maybe_fail"
    assert "decorator form" in create_then_maybe_fail.__doc__


async def test_decorator_with_using():
    assert await create_with_alias("Ann") is True
    assert await committed_names() == ["Ann"]
    assert isinstance(async_atomic(using="default"), AsyncAtomic)


async def test_a_decorated_function_called_concurrently_runs_one_transaction_per_call():
    @async_atomic
    async def record(i: int) -> tuple[int, int]:
        first = await txid()
        await Author.objects.acreate(name=f"author {i}")
        await asyncio.sleep(0)
        if i % 2:
            raise Boom
        return first, await txid()

    results = await asyncio.gather(*(record(i) for i in range(10)), return_exceptions=True)
    committed = [r for r in results if not isinstance(r, BaseException)]
    assert [type(r) for r in results[1::2]] == [Boom] * 5
    assert all(first == last for first, last in committed)
    assert len({first for first, _ in committed}) == 5
    assert await committed_names() == [f"author {i}" for i in range(0, 10, 2)]


async def test_decorating_a_sync_function_is_a_type_error():
    with pytest.raises(TypeError, match="async functions"):

        @async_atomic
        def not_async() -> None:
            pass


async def test_durable_block_commits_at_top_level():
    async with async_atomic(durable=True):
        await Author.objects.acreate(name="Ann")
    assert await committed_names() == ["Ann"]


async def test_durable_block_nested_in_another_is_a_runtime_error():
    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="Ann")
            async with async_atomic(durable=True):
                pass

    with pytest.raises(RuntimeError, match="durable"):
        await block()
    assert await committed_names() == []
    assert not async_connections["default"].in_atomic_block


async def test_independent_connection_commits_although_the_outer_block_rolls_back():
    conn = async_connections["default"]

    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="rolled back")
            outer_pid = await backend_pid()
            async with async_connections.independent_connection() as independent:
                assert not independent.in_atomic_block
                assert not async_connections["default"].in_atomic_block
                assert await backend_pid() != outer_pid
                await Author.objects.acreate(name="audit log")  # ORM uses it too
            assert conn.in_atomic_block
            assert await backend_pid() == outer_pid
            assert await Author.objects.acount() == 2  # we see our row and the committed one
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await committed_names() == ["audit log"]


async def test_independent_connection_can_run_its_own_atomic_block():
    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="rolled back")
            async with async_connections.independent_connection(), async_atomic(durable=True):
                await Author.objects.acreate(name="independent")
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await committed_names() == ["independent"]


async def backend_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        return (await cur.fetchone())[0]


async def test_select_for_update_locks_rows_until_the_block_ends():
    account = await Account.objects.acreate(name="a", balance=100)
    locked = asyncio.Event()
    release = asyncio.Event()

    async def hold_lock() -> None:
        async with async_atomic():
            await Account.objects.select_for_update().aget(pk=account.pk)
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold_lock())
    await locked.wait()

    async def try_lock() -> None:
        async with async_atomic():
            await Account.objects.select_for_update(nowait=True).aget(pk=account.pk)

    with pytest.raises(OperationalError):
        await in_other_task(try_lock)
    release.set()
    await holder
    await in_other_task(try_lock)  # free again


async def test_concurrent_read_modify_write_with_select_for_update_loses_no_update():
    account = await Account.objects.acreate(name="a", balance=0)

    async def deposit() -> None:
        async with async_atomic():
            acc = await Account.objects.select_for_update().aget(pk=account.pk)
            await asyncio.sleep(0)  # other tasks run (and wait on the row lock)
            acc.balance += 10
            await acc.asave(update_fields=["balance"])

    await asyncio.gather(*(deposit() for _ in range(20)))
    await account.arefresh_from_db()
    assert account.balance == 200


@pytest.mark.django_db(transaction=True, databases=["default", "other"], available_apps=APPS)
async def test_using_another_alias_runs_on_that_database():
    async with async_atomic(using="other"):
        assert async_connections["other"].in_atomic_block
        assert not async_connections["default"].in_atomic_block
        await Author.objects.using("other").acreate(name="elsewhere")
        async with async_connections["other"].cursor() as cur:
            await cur.execute("SELECT current_database()")
            (other_db,) = await cur.fetchone()
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT current_database()")
        (default_db,) = await cur.fetchone()
    assert other_db != default_db
    assert await Author.objects.using("other").acount() == 1
    assert await Author.objects.acount() == 0
