"""Several aliases on the ENGINE: ``using()``, ``async_atomic(using=...)``, two-alias blocks."""

from __future__ import annotations

import asyncio

import pytest
from django.db import connections, transaction

from django_async_db import async_atomic, async_connections
from tests.testapp.models import Author, Book

from .conftest import ALIASES, APPS, names_on

pytestmark = pytest.mark.django_db(transaction=True, databases=ALIASES, available_apps=APPS)


class Boom(Exception):
    """Raised inside a block to roll it back."""


async def test_each_alias_is_its_own_database():
    async def database(alias: str) -> str:
        async with async_connections[alias].cursor() as cur:
            await cur.execute("SELECT current_database()")
            return (await cur.fetchone())[0]

    default, other = await asyncio.gather(database("default"), database("other"))
    assert default != other
    assert other.endswith("_other")


async def test_using_sends_every_async_call_to_that_alias():
    author = await Author.objects.using("other").acreate(name="ann")
    assert author._state.db == "other"
    await Book.objects.using("other").acreate(title="t", author=author)
    assert await names_on("other") == ["ann"]
    assert await names_on("default") == []

    fetched = await Author.objects.using("other").aget(name="ann")
    assert fetched._state.db == "other"
    assert [b.title async for b in fetched.books.all()] == ["t"]
    fetched.name = "bea"
    await fetched.asave()
    assert await names_on("other") == ["bea"]
    assert await Author.objects.using("other").filter(name="bea").aupdate(name="cy") == 1
    await fetched.arefresh_from_db()
    assert fetched.name == "cy"
    assert await Author.objects.acount() == 0
    await fetched.adelete()
    assert await Author.objects.using("other").acount() == 0


async def test_async_atomic_using_rolls_back_only_that_alias():
    async def block() -> None:
        async with async_atomic(using="other"):
            assert async_connections["other"].in_atomic_block
            assert not async_connections["default"].in_atomic_block
            await Author.objects.using("other").acreate(name="rolled back")
            await Author.objects.acreate(name="autocommitted")
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await names_on("other") == []
    assert await names_on("default") == ["autocommitted"]


async def test_a_block_on_two_aliases_commits_both():
    async with async_atomic("default"), async_atomic("other"):
        await Author.objects.acreate(name="d")
        await Author.objects.using("other").acreate(name="o")
        # Neither is visible from another task before the commits.
        assert await asyncio.create_task(names_on("default")) == []
        assert await asyncio.create_task(names_on("other")) == []
    assert await names_on("default") == ["d"]
    assert await names_on("other") == ["o"]


async def test_an_error_in_a_block_on_two_aliases_rolls_both_back():
    async def block() -> None:
        async with async_atomic("default"), async_atomic("other"):
            await Author.objects.acreate(name="d")
            await Author.objects.using("other").acreate(name="o")
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await names_on("default") == []
    assert await names_on("other") == []


async def test_two_alias_transactions_are_independent_like_djangos():
    # No two-phase commit, as with Django's atomic(): the inner block on
    # "other" commits when it exits, whatever the outer block on "default" does.
    async def block() -> None:
        async with async_atomic("default"):
            await Author.objects.acreate(name="d")
            async with async_atomic("other"):
                await Author.objects.using("other").acreate(name="o")
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert await names_on("default") == []
    assert await names_on("other") == ["o"]


async def test_on_commit_runs_per_alias():
    ran: list[str] = []

    async def block() -> None:
        async with async_atomic("default"):
            async with async_atomic("other"):
                await async_connections["other"].on_commit(lambda: ran.append("other"))
            await async_connections["default"].on_commit(lambda: ran.append("default"))
            raise Boom

    with pytest.raises(Boom):
        await block()
    assert ran == ["other"]


async def test_concurrent_tasks_write_to_both_aliases_in_their_own_transactions():
    async def worker(n: int) -> None:
        async with async_atomic("default"), async_atomic("other"):
            await Author.objects.acreate(name=f"d{n:02}")
            await asyncio.sleep(0)
            await Author.objects.using("other").acreate(name=f"o{n:02}")
            if n % 2:
                raise Boom

    results = await asyncio.gather(*(worker(n) for n in range(20)), return_exceptions=True)
    assert sum(isinstance(r, Boom) for r in results) == 10
    assert await names_on("default") == [f"d{n:02}" for n in range(0, 20, 2)]
    assert await names_on("other") == [f"o{n:02}" for n in range(0, 20, 2)]


def _djangos_outcome() -> None:
    """The same scenarios with Django's own sync ``atomic()`` (in a thread, no loop)."""
    try:
        _djangos_scenarios()
    finally:
        connections.close_all()  # this worker thread's own connections


def _djangos_scenarios() -> None:
    try:
        with transaction.atomic("default"):
            Author.objects.create(name="sync d")
            with transaction.atomic("other"):
                Author.objects.using("other").create(name="sync o")
            raise Boom
    except Boom:
        pass
    try:
        with transaction.atomic("default"), transaction.atomic("other"):
            Author.objects.create(name="sync both d")
            Author.objects.using("other").create(name="sync both o")
            raise Boom
    except Boom:
        pass


async def test_two_alias_outcomes_match_djangos_atomic():
    async def ours() -> None:
        async def inner_commits() -> None:
            async with async_atomic("default"):
                await Author.objects.acreate(name="async d")
                async with async_atomic("other"):
                    await Author.objects.using("other").acreate(name="async o")
                raise Boom

        async def both_roll_back() -> None:
            async with async_atomic("default"), async_atomic("other"):
                await Author.objects.acreate(name="async both d")
                await Author.objects.using("other").acreate(name="async both o")
                raise Boom

        for scenario in (inner_commits, both_roll_back):
            with pytest.raises(Boom):
                await scenario()

    await ours()
    await asyncio.to_thread(_djangos_outcome)
    default, other = await names_on("default"), await names_on("other")
    assert default == []
    assert other == ["async o", "sync o"]
