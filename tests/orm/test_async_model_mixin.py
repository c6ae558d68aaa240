"""``AsyncModelMixin``: ``await obj.a<relation>`` and ``obj.a<manager>`` from async code."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.db.models import Model

from django_async_db import async_connections, run_sync
from django_async_db.models import AsyncModelMixin, RelatedObjectAwaitable
from tests.orm.conftest import assert_on_loop, rolled_back
from tests.testapp.models import Author, Book, Chapter, ChapterNote

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def count_queries():
    """Count the statements this task's connection runs in the block."""
    queries: list[str] = []

    def record(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    with async_connections["default"].wrapper.execute_wrapper(record):
        yield queries


async def chapter_with_book() -> tuple[Book, Chapter]:
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    chapter = await Chapter.objects.acreate(title="one", book=book)
    return book, await Chapter.objects.aget(pk=chapter.pk)


# --- single-valued relations --------------------------------------------------------


async def test_forward_fk(thread_probe):
    book, chapter = await chapter_with_book()
    with pytest.raises(SynchronousOnlyOperation):
        _ = chapter.book  # the sync attribute would block
    with count_queries() as queries:
        loaded = await chapter.abook
        assert loaded.pk == book.pk
        assert await chapter.abook is loaded  # cached: no second query
        assert chapter.book is loaded  # and the sync attribute is loaded too
    assert len(queries) == 1
    assert_on_loop(thread_probe)


async def test_forward_fk_null_is_none_without_a_query():
    chapter = await Chapter.objects.acreate(title="loose")
    fresh = await Chapter.objects.aget(pk=chapter.pk)
    with count_queries() as queries:
        assert await fresh.abook is None
    assert queries == []


async def test_forward_fk_of_a_deferred_key(thread_probe):
    book, chapter = await chapter_with_book()
    partial = await Chapter.objects.only("title").aget(pk=chapter.pk)
    assert (await partial.abook).title == book.title  # loads book_id, then the book
    assert_on_loop(thread_probe)


async def test_forward_one_to_one(thread_probe):
    _, chapter = await chapter_with_book()
    first = await ChapterNote.objects.acreate(chapter=chapter, text="first")
    second = await ChapterNote.objects.acreate(chapter=chapter, text="second", previous=first)
    fresh = await ChapterNote.objects.aget(pk=second.pk)
    assert (await fresh.aprevious).text == "first"
    assert await (await ChapterNote.objects.aget(pk=first.pk)).aprevious is None
    assert (await fresh.achapter).title == "one"
    assert_on_loop(thread_probe)


async def test_reverse_one_to_one(thread_probe):
    _, chapter = await chapter_with_book()
    first = await ChapterNote.objects.acreate(chapter=chapter, text="first")
    await ChapterNote.objects.acreate(chapter=chapter, text="second", previous=first)
    fresh = await ChapterNote.objects.aget(pk=first.pk)
    assert (await fresh.afollower).text == "second"
    last = await ChapterNote.objects.aget(text="second")
    with pytest.raises(ChapterNote.follower.RelatedObjectDoesNotExist):
        await last.afollower  # like the sync attribute
    assert_on_loop(thread_probe)


async def test_nothing_runs_until_awaited():
    _, chapter = await chapter_with_book()
    with count_queries() as queries:
        pending = chapter.abook
        assert isinstance(pending, RelatedObjectAwaitable)
        del pending  # never awaited: no query, no "never awaited" warning
    assert queries == []


async def test_awaitables_gathered_in_tasks():
    _, one = await chapter_with_book()
    two = await Chapter.objects.acreate(title="two", book=await one.abook)
    fresh = [c async for c in Chapter.objects.filter(pk__in=[one.pk, two.pk]).order_by("title")]
    books = await asyncio.gather(*(c.abook for c in fresh))
    assert [b.title for b in books] == ["A", "A"]


async def test_sees_the_transactions_rows(thread_probe):
    async with rolled_back():
        _, chapter = await chapter_with_book()  # all uncommitted
        assert (await chapter.abook).title == "A"
    assert not await Chapter.objects.aexists()
    assert_on_loop(thread_probe)


# --- many-valued relations ----------------------------------------------------------


async def test_m2m_manager(thread_probe):
    book, chapter = await chapter_with_book()
    assert chapter.acites.model is Book
    async with rolled_back():
        await chapter.acites.aadd(book)
        assert [b.title async for b in chapter.acites.all()] == ["A"]
        assert await chapter.acites.acount() == 1
    assert await chapter.acites.acount() == 0
    assert_on_loop(thread_probe)


async def test_reverse_fk_manager(thread_probe):
    _, chapter = await chapter_with_book()
    async with rolled_back():
        note = await chapter.anotes.acreate(text="n")
        assert [n.pk async for n in chapter.anotes.all()] == [note.pk]
    assert not await chapter.anotes.aexists()
    assert_on_loop(thread_probe)


# --- what the mixin must not change -------------------------------------------------


async def test_real_attributes_win():
    _, chapter = await chapter_with_book()
    assert chapter.asave.__func__ is Model.asave
    assert chapter.adelete.__func__ is Model.adelete
    assert chapter.arefresh_from_db.__func__ is Model.arefresh_from_db
    chapter.abook = "set on the instance"  # non-data descriptors: the instance wins
    assert chapter.abook == "set on the instance"


async def test_unknown_names_raise_attribute_error():
    _, chapter = await chapter_with_book()
    for name in ("atitle", "anything", "a", "_state_x", "__missing__"):
        assert not hasattr(chapter, name)
    with pytest.raises(AttributeError, match="'Chapter' object has no attribute 'abogus'"):
        _ = chapter.abogus


async def test_mixin_is_opt_in():
    book, _ = await chapter_with_book()
    assert not isinstance(book, AsyncModelMixin)
    assert not hasattr(book, "aauthor")


async def test_sync_relation_errors_stay_djangos():
    _, chapter = await chapter_with_book()
    note = await ChapterNote.objects.acreate(chapter=chapter)

    def missing_follower() -> bool:
        with pytest.raises(ChapterNote.follower.RelatedObjectDoesNotExist, match="has no follower"):
            _ = note.follower
        return hasattr(note, "follower")

    assert await run_sync(missing_follower) is False
