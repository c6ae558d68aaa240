"""``select_for_update()`` inside ``async_atomic``: real row locks held across awaits."""

from __future__ import annotations

import asyncio

import pytest
from django.db import DatabaseError, OperationalError, transaction
from django.db.transaction import TransactionManagementError

from django_async_db import async_atomic
from tests.orm.conftest import assert_on_loop
from tests.testapp.models import Account, Author, Book

pytestmark = pytest.mark.django_db(transaction=True)


async def in_other_task(coro):
    """Run ``coro`` in a new task: its own connection, its own transaction."""
    return await asyncio.create_task(coro)


async def try_nowait(pk: int) -> Account:
    async with async_atomic():
        return await Account.objects.select_for_update(nowait=True).aget(pk=pk)


async def test_aget_locks_the_row_until_commit(thread_probe):
    acc = await Account.objects.acreate(name="a", balance=10)
    async with async_atomic():
        locked = await Account.objects.select_for_update().aget(pk=acc.pk)
        with pytest.raises(OperationalError, match="could not obtain lock"):
            await in_other_task(try_nowait(acc.pk))
        locked.balance += 5
        await locked.asave(update_fields=["balance"])
    # Released at commit: now the other task gets it.
    assert (await in_other_task(try_nowait(acc.pk))).balance == 15
    assert_on_loop(thread_probe)


async def test_lock_error_is_a_database_error():
    acc = await Account.objects.acreate(name="a")
    async with async_atomic():
        await Account.objects.select_for_update().filter(pk=acc.pk).aexists()
        with pytest.raises(DatabaseError):
            await in_other_task(try_nowait(acc.pk))


async def test_nowait_inside_async_atomic(thread_probe):
    acc = await Account.objects.acreate(name="a")
    async with async_atomic():
        got = await Account.objects.select_for_update(nowait=True).aget(pk=acc.pk)
        assert got.pk == acc.pk
    assert_on_loop(thread_probe)


async def test_skip_locked(thread_probe):
    first = await Account.objects.acreate(name="first")
    second = await Account.objects.acreate(name="second")

    async def free_accounts() -> list[str]:
        async with async_atomic():
            qs = Account.objects.select_for_update(skip_locked=True).order_by("name")
            return [a.name async for a in qs]

    async with async_atomic():
        assert (await Account.objects.select_for_update().aget(pk=first.pk)).name == "first"
        assert await in_other_task(free_accounts()) == ["second"]
    assert await in_other_task(free_accounts()) == ["first", "second"]
    assert second.pk is not None
    assert_on_loop(thread_probe)


async def test_of_locks_only_the_named_tables(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)

    async def lock_author_nowait() -> str:
        async with async_atomic():
            return (await Author.objects.select_for_update(nowait=True).aget(pk=ann.pk)).name

    async def lock_book_nowait() -> str:
        async with async_atomic():
            return (await Book.objects.select_for_update(nowait=True).aget(pk=book.pk)).title

    async with async_atomic():
        locked = await (
            Book.objects.select_related("author").select_for_update(of=("self",)).aget(pk=book.pk)
        )
        assert locked.author.name == "Ann"  # joined, not locked
        assert await in_other_task(lock_author_nowait()) == "Ann"
        with pytest.raises(OperationalError):
            await in_other_task(lock_book_nowait())
    assert_on_loop(thread_probe)


async def test_a_blocked_locker_waits_without_blocking_the_loop():
    acc = await Account.objects.acreate(name="a", balance=0)
    order: list[str] = []

    async def add_one() -> None:
        async with async_atomic():
            row = await Account.objects.select_for_update().aget(pk=acc.pk)
            order.append("second got the lock")
            row.balance += 1
            await row.asave()

    async with async_atomic():
        row = await Account.objects.select_for_update().aget(pk=acc.pk)
        waiter = asyncio.create_task(add_one())
        await asyncio.sleep(0.2)  # the loop runs on while the other task waits on the lock
        assert not waiter.done()
        order.append("first commits")
        row.balance += 10
        await row.asave()
    async with asyncio.timeout(10):
        await waiter
    assert order == ["first commits", "second got the lock"]
    assert (await Account.objects.aget(pk=acc.pk)).balance == 11


async def test_outside_a_transaction_raises_djangos_error():
    acc = await Account.objects.acreate(name="a")
    with pytest.raises(TransactionManagementError, match="outside of a transaction"):
        await Account.objects.select_for_update().aget(pk=acc.pk)
    with pytest.raises(TransactionManagementError):
        [a async for a in Account.objects.select_for_update()]


async def test_sync_atomic_in_run_sync_holds_the_lock_too():
    from django_async_db import run_sync

    acc = await Account.objects.acreate(name="a")
    release = asyncio.Event()
    locked = asyncio.Event()

    async def hold() -> None:
        def lock() -> None:
            with transaction.atomic():
                Account.objects.select_for_update().get(pk=acc.pk)
                locked.set()
                from django_async_db import await_only

                await_only(release.wait())

        await run_sync(lock)

    holder = asyncio.create_task(hold())
    await locked.wait()
    with pytest.raises(OperationalError):
        await in_other_task(try_nowait(acc.pk))
    release.set()
    await holder
    assert (await in_other_task(try_nowait(acc.pk))).pk == acc.pk
