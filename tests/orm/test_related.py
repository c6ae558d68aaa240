"""Related managers' ``a*`` methods (reverse FK, M2M) run on the loop, in the task's transaction."""

from __future__ import annotations

import pytest
from django.db.models import Prefetch, aprefetch_related_objects

from django_async_db import async_atomic
from tests.orm.conftest import assert_on_loop, rolled_back
from tests.testapp.models import Author, Book, Chapter, Tag

pytestmark = pytest.mark.django_db(transaction=True)


class Rollback(Exception):
    pass


async def titles(manager) -> list[str]:
    return sorted([o.title async for o in manager.all()])


async def names(manager) -> list[str]:
    return sorted([o.name async for o in manager.all()])


# --- the headline case ----------------------------------------------------------


async def test_aadd_of_a_tag_created_in_the_same_transaction(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)

    async def tag_then_fail() -> None:
        async with async_atomic():
            tag = await Tag.objects.acreate(name="new")  # not committed: only this task sees it
            await book.tags.aadd(tag)  # same connection: no foreign-key violation
            assert await names(book.tags) == ["new"]
            raise Rollback

    with pytest.raises(Rollback):
        await tag_then_fail()
    assert not await Tag.objects.aexists()
    assert not await Book.tags.through.objects.aexists()
    assert await names(book.tags) == []
    assert_on_loop(thread_probe)


# --- reverse foreign key ------------------------------------------------------------


async def test_reverse_fk_aadd(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    bob = await Author.objects.acreate(name="Bob")
    saved = await Book.objects.acreate(title="saved", author=bob)
    async with rolled_back():
        await ann.books.aadd(saved)  # bulk: one UPDATE
        await ann.books.aadd(Book(title="unsaved", author=bob), bulk=False)  # saved by add
        assert await titles(ann.books) == ["saved", "unsaved"]
    assert await titles(ann.books) == []
    assert await titles(bob.books) == ["saved"]
    assert_on_loop(thread_probe)


async def test_reverse_fk_acreate(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    async with rolled_back():
        book = await ann.books.acreate(title="A", pages=7)
        assert (book.author_id, book.pages) == (ann.pk, 7)
    assert not await Book.objects.aexists()
    assert_on_loop(thread_probe)


async def test_reverse_fk_aget_or_create(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    async with rolled_back():
        book, created = await ann.books.aget_or_create(title="A", defaults={"pages": 5})
        again, created_again = await ann.books.aget_or_create(title="A")
        assert (created, created_again, again.pk, again.pages) == (True, False, book.pk, 5)
    assert not await Book.objects.aexists()
    assert_on_loop(thread_probe)


async def test_reverse_fk_aupdate_or_create(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    await ann.books.acreate(title="A", pages=1)
    async with rolled_back():
        book, created = await ann.books.aupdate_or_create(title="A", defaults={"pages": 2})
        assert (book.pages, created) == (2, False)
        _, created = await ann.books.aupdate_or_create(title="B", defaults={"pages": 3})
        assert created
    assert [(b.title, b.pages) async for b in ann.books.all()] == [("A", 1)]
    assert_on_loop(thread_probe)


async def test_reverse_fk_aremove_and_aclear(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    one, two, _ = [await book.chapters.acreate(title=t) for t in ("1", "2", "3")]
    async with rolled_back():
        await book.chapters.aremove(one)
        await book.chapters.aremove(two, bulk=False)
        assert await titles(book.chapters) == ["3"]
        await book.chapters.aclear()
        assert await titles(book.chapters) == []
        assert await Chapter.objects.filter(book__isnull=True).acount() == 3
    assert await titles(book.chapters) == ["1", "2", "3"]
    await book.chapters.aclear(bulk=False)
    assert await titles(book.chapters) == []
    assert_on_loop(thread_probe)


async def test_reverse_fk_aset(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    one, two, three = [await Chapter.objects.acreate(title=t) for t in ("1", "2", "3")]
    await book.chapters.aadd(one, two)
    assert three.book_id is None
    async with rolled_back():
        await book.chapters.aset([two, three])
        assert await titles(book.chapters) == ["2", "3"]
        await book.chapters.aset([one], clear=True)
        assert await titles(book.chapters) == ["1"]
    assert await titles(book.chapters) == ["1", "2"]
    assert_on_loop(thread_probe)


# --- many-to-many, both directions --------------------------------------------------


async def test_m2m_aadd_and_aremove(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    red, blue, green = [await Tag.objects.acreate(name=n) for n in ("red", "blue", "green")]
    await book.tags.aadd(red)
    async with rolled_back():
        await book.tags.aadd(blue, green.pk)  # instances or primary keys
        await book.tags.aremove(red)
        assert await names(book.tags) == ["blue", "green"]
        await green.books.aremove(book)  # the reverse side
        assert await names(book.tags) == ["blue"]
    assert await names(book.tags) == ["red"]
    assert_on_loop(thread_probe)


async def test_m2m_aset_and_aclear(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    other = await Book.objects.acreate(title="B", author=ann)
    red, blue = [await Tag.objects.acreate(name=n) for n in ("red", "blue")]
    await book.tags.aset([red])
    async with rolled_back():
        await book.tags.aset([blue], clear=True)
        assert await names(book.tags) == ["blue"]
        await blue.books.aset([book, other])
        assert await titles(blue.books) == ["A", "B"]
        await book.tags.aclear()
        await blue.books.aclear()
        assert not await Book.tags.through.objects.aexists()
    assert await names(book.tags) == ["red"]
    assert await titles(blue.books) == []
    assert_on_loop(thread_probe)


async def test_m2m_acreate(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    red = await Tag.objects.acreate(name="red")
    async with rolled_back():
        made = await book.tags.acreate(name="made")
        assert await names(book.tags) == ["made"]
        back = await red.books.acreate(title="from tag", author=ann)
        assert await titles(red.books) == ["from tag"]
        assert {made.pk, back.pk} != {None}
    assert await names(book.tags) == []
    assert await Book.objects.acount() == 1
    assert_on_loop(thread_probe)


async def test_m2m_aget_or_create(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    async with rolled_back():
        tag, created = await book.tags.aget_or_create(name="red")
        again, created_again = await book.tags.aget_or_create(name="red")
        assert (created, created_again, again.pk) == (True, False, tag.pk)
    assert not await Tag.objects.aexists()
    assert_on_loop(thread_probe)


async def test_m2m_aupdate_or_create(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    red = await Tag.objects.acreate(name="red")
    await red.books.aadd(book)
    async with rolled_back():
        updated, created = await red.books.aupdate_or_create(title="A", defaults={"pages": 9})
        assert (updated.pk, updated.pages, created) == (book.pk, 9, False)
        _, created = await book.tags.aupdate_or_create(name="blue")
        assert created
        assert await names(book.tags) == ["blue", "red"]
    await book.arefresh_from_db()
    assert book.pages == 100
    assert await names(book.tags) == ["red"]
    assert_on_loop(thread_probe)


# --- aprefetch_related_objects ------------------------------------------------------


async def test_aprefetch_related_objects(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    books = [await Book.objects.acreate(title=t, author=ann) for t in "AB"]
    red = await Tag.objects.acreate(name="red")
    await books[0].tags.aadd(red)
    fresh = [b async for b in Book.objects.order_by("title")]
    await aprefetch_related_objects(
        fresh, "author", Prefetch("tags", queryset=Tag.objects.order_by("name"))
    )
    # Loaded: plain attribute access needs no bridge now.
    assert [(b.author.name, [t.name for t in b.tags.all()]) for b in fresh] == [
        ("Ann", ["red"]),
        ("Ann", []),
    ]
    assert_on_loop(thread_probe)


async def test_aprefetch_related_objects_sees_the_transaction(thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    async with rolled_back():
        await book.tags.acreate(name="tx")
        fresh = await Book.objects.aget(pk=book.pk)
        await aprefetch_related_objects([fresh], "tags")
        assert [t.name for t in fresh.tags.all()] == ["tx"]
    assert_on_loop(thread_probe)
