"""Model instance methods, shortcuts, lazy relations and sync code inside the bridge."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import SynchronousOnlyOperation
from django.db import transaction
from django.db.models.signals import post_delete, pre_delete
from django.http import Http404
from django.shortcuts import aget_list_or_404, aget_object_or_404

from django_async_db import await_only, run_sync
from tests.orm.conftest import assert_on_loop, rolled_back
from tests.testapp.models import Author, Book, Review, Tag

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    pass


# --- asave / adelete / arefresh_from_db -----------------------------------------


async def test_asave_inserts_and_updates(thread_probe):
    ann = Author(name="Ann")
    await ann.asave()
    assert ann.pk is not None
    ann.name, ann.bio = "Anne", "changed"
    await ann.asave(update_fields=["name"])
    fresh = await Author.objects.aget(pk=ann.pk)
    assert (fresh.name, fresh.bio) == ("Anne", "")
    assert_on_loop(thread_probe)


async def test_asave_is_undone_by_a_rollback(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    async with rolled_back():
        ann.name = "changed"
        await ann.asave()
        await Author(name="new").asave()
        assert await Author.objects.filter(name__in=["changed", "new"]).acount() == 2
    assert [a.name async for a in Author.objects.all()] == ["Ann"]
    assert_on_loop(thread_probe)


async def test_adelete_is_undone_by_a_rollback(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    async with rolled_back():
        assert await ann.adelete() == (1, {"testapp.Author": 1})
        assert not await Author.objects.aexists()
    assert await Author.objects.filter(name="Ann").aexists()
    assert_on_loop(thread_probe)


async def test_arefresh_from_db(thread_probe):
    ann = await Author.objects.acreate(name="Ann", bio="b")
    await Author.objects.filter(pk=ann.pk).aupdate(name="Anne", bio="c")
    await ann.arefresh_from_db(fields=["name"])
    assert (ann.name, ann.bio) == ("Anne", "b")
    await ann.arefresh_from_db()
    assert ann.bio == "c"
    await Author.objects.filter(pk=ann.pk).aupdate(bio="d")
    await ann.arefresh_from_db(from_queryset=Author.objects.only("bio"))
    assert ann.bio == "d"
    assert_on_loop(thread_probe)


async def test_arefresh_from_db_sees_the_transactions_writes(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    async with rolled_back():
        await Author.objects.filter(pk=ann.pk).aupdate(name="in tx")
        await ann.arefresh_from_db()
        assert ann.name == "in tx"
    await ann.arefresh_from_db()
    assert ann.name == "Ann"
    assert_on_loop(thread_probe)


async def test_cascading_adelete_reports_counts_and_fires_signals(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    books = [await Book.objects.acreate(title=t, author=ann) for t in "AB"]
    tag = await Tag.objects.acreate(name="t")
    await books[0].tags.aadd(tag)
    for stars in (1, 2, 3):
        await Review.objects.acreate(book=books[0], stars=stars)

    review_pks = [r async for r in Review.objects.values_list("pk", flat=True)]
    expected = {("Author", ann.pk)} | {("Book", b.pk) for b in books}
    expected |= {("Review", pk) for pk in review_pks}
    seen: list[tuple[str, str, object]] = []

    def pre(sender, instance, **kwargs):
        seen.append(("pre", sender.__name__, instance.pk))

    async def post(sender, instance, **kwargs):
        seen.append(("post", sender.__name__, instance.pk))

    pre_delete.connect(pre, dispatch_uid="cascade-pre")
    post_delete.connect(post, dispatch_uid="cascade-post")
    try:
        async with rolled_back():
            result = await ann.adelete()
            assert result == (
                7,
                {
                    "testapp.Review": 3,
                    "testapp.Book_tags": 1,
                    "testapp.Book": 2,
                    "testapp.Author": 1,
                },
            )
            assert not await Review.objects.aexists()
        # 6 model instances were deleted (the through rows send no signal), each
        # with a pre_delete and a post_delete signal.
        assert {(name, pk) for when, name, pk in seen if when == "pre"} == expected
        assert {(name, pk) for when, name, pk in seen if when == "post"} == expected
        assert len(seen) == 12
    finally:
        pre_delete.disconnect(dispatch_uid="cascade-pre")
        post_delete.disconnect(dispatch_uid="cascade-post")
    assert await Review.objects.acount() == 3
    assert await Book.objects.acount() == 2
    assert_on_loop(thread_probe)


# --- shortcuts ------------------------------------------------------------------


async def test_aget_object_or_404(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    assert (await aget_object_or_404(Author, name="Ann")).pk == ann.pk
    assert (await aget_object_or_404(Author.objects.filter(pk=ann.pk))).name == "Ann"
    with pytest.raises(Http404):
        await aget_object_or_404(Author, name="nobody")
    async with rolled_back():
        await Author.objects.acreate(name="tx")
        assert (await aget_object_or_404(Author.objects, name="tx")).name == "tx"
    with pytest.raises(Http404):
        await aget_object_or_404(Author, name="tx")
    assert_on_loop(thread_probe)


async def test_aget_list_or_404(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    await Book.objects.acreate(title="A", author=ann)
    await Book.objects.acreate(title="B", author=ann)
    titles = sorted(b.title for b in await aget_list_or_404(Book, author=ann))
    assert titles == ["A", "B"]
    with pytest.raises(Http404):
        await aget_list_or_404(Book.objects.filter(title="Z"))
    assert_on_loop(thread_probe)


# --- lazy relation access and sync code in the bridge ---------------------------


async def test_lazy_relation_outside_a_bridge_names_the_fix():
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    fresh = await Book.objects.aget(pk=book.pk)
    with pytest.raises(SynchronousOnlyOperation) as info:
        _ = fresh.author
    message = str(info.value)
    for fix in ("select_related", "prefetch_related", "run_sync"):
        assert fix in message


async def test_relation_access_in_run_sync(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    fresh = await Book.objects.aget(pk=book.pk)
    author = await run_sync(lambda: fresh.author)
    assert author.name == "Ann"
    assert fresh.author is author  # cached now: plain attribute access works
    titles = await run_sync(lambda: [b.title for b in author.books.all()])
    assert titles == ["A"]
    assert_on_loop(thread_probe)


async def test_sync_orm_code_in_run_sync_shares_the_transaction(thread_probe):
    def sync_work() -> int:
        Author.objects.create(name="sync")
        with transaction.atomic():  # a savepoint inside the async transaction
            Author.objects.create(name="nested")
        return Author.objects.count()

    async with rolled_back():
        assert await run_sync(sync_work) == 2
    assert await Author.objects.acount() == 0
    assert_on_loop(thread_probe)


async def create_author(name: str) -> Author:
    return await Author.objects.acreate(name=name)


async def test_async_to_sync_inside_run_sync_works_in_the_task(thread_probe):
    """Sync code calling ``async_to_sync`` inside the bridge: runs in the task, no deadlock."""

    def sync_code() -> str:
        with transaction.atomic():
            made = async_to_sync(create_author)("from async_to_sync")
            assert Author.objects.filter(pk=made.pk).exists()  # same transaction
            raise Boom

    async with asyncio.timeout(10):
        with pytest.raises(Boom):
            await run_sync(sync_code)
    assert not await Author.objects.aexists()
    assert_on_loop(thread_probe)


async def test_await_only_inside_run_sync(thread_probe):
    def sync_code() -> str:
        return await_only(create_author("awaited")).name

    async with asyncio.timeout(10):
        assert await run_sync(sync_code) == "awaited"
    assert_on_loop(thread_probe)
