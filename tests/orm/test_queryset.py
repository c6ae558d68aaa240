"""Every QuerySet ``a*`` terminal and ``async for`` shape: on the loop, in the transaction."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.db.models import Avg, Count, F, Max, Sum
from django.db.models.functions import JSONObject, Upper

from django_async_db import async_connections, run_sync
from tests.orm.conftest import assert_on_loop, rolled_back
from tests.testapp.models import Author, Book, Tag

pytestmark = pytest.mark.django_db(transaction=True)

UTC = dt.UTC


def day(n: int) -> dt.datetime:
    return dt.datetime(2024, 1, n, tzinfo=UTC)


async def library() -> tuple[Author, Author, list[Book]]:
    """Create two authors and three books (Ann: A, B; Bob: C), tags on A."""
    ann = await Author.objects.acreate(name="Ann")
    bob = await Author.objects.acreate(name="Bob")
    books = [
        await Book.objects.acreate(title="A", author=ann, pages=100, published=day(1)),
        await Book.objects.acreate(title="B", author=ann, pages=200, published=day(2)),
        await Book.objects.acreate(title="C", author=bob, pages=300, published=day(3)),
    ]
    red = await Tag.objects.acreate(name="red")
    blue = await Tag.objects.acreate(name="blue")
    await books[0].tags.aadd(red, blue)
    return ann, bob, books


# --- terminals that read --------------------------------------------------------


async def test_aget(thread_probe):
    ann, _, _ = await library()
    assert (await Author.objects.aget(name="Ann")).pk == ann.pk
    with pytest.raises(Author.DoesNotExist):
        await Author.objects.aget(name="nobody")
    with pytest.raises(Book.MultipleObjectsReturned):
        await Book.objects.aget(author=ann)
    assert_on_loop(thread_probe)


async def test_acount(thread_probe):
    ann, _, _ = await library()
    assert await Book.objects.acount() == 3
    assert await Book.objects.filter(author=ann).acount() == 2
    assert_on_loop(thread_probe)


async def test_ain_bulk(thread_probe):
    _, _, books = await library()
    found = await Book.objects.ain_bulk([books[0].pk, books[2].pk])
    assert {pk: b.title for pk, b in found.items()} == {books[0].pk: "A", books[2].pk: "C"}
    by_name = await Tag.objects.ain_bulk(["red"], field_name="name")
    assert list(by_name) == ["red"]
    assert_on_loop(thread_probe)


async def test_alatest_and_aearliest(thread_probe):
    await library()
    assert (await Book.objects.alatest("published")).title == "C"
    assert (await Book.objects.aearliest("published")).title == "A"
    assert (await Book.objects.alatest("pages", "published")).title == "C"
    with pytest.raises(Book.DoesNotExist):
        await Book.objects.filter(pages=0).alatest("published")
    assert_on_loop(thread_probe)


async def test_afirst_and_alast(thread_probe):
    await library()
    assert (await Book.objects.order_by("pages").afirst()).title == "A"
    assert (await Book.objects.order_by("pages").alast()).title == "C"
    assert await Book.objects.filter(pages=0).afirst() is None
    assert_on_loop(thread_probe)


async def test_aaggregate(thread_probe):
    await library()
    result = await Book.objects.aaggregate(Sum("pages"), avg=Avg("pages"), most=Max("pages"))
    assert result == {"pages__sum": 600, "avg": 200.0, "most": 300}
    assert_on_loop(thread_probe)


async def test_aexists(thread_probe):
    await library()
    assert await Book.objects.filter(title="A").aexists()
    assert not await Book.objects.filter(title="Z").aexists()
    assert_on_loop(thread_probe)


async def test_acontains(thread_probe):
    ann, _, books = await library()
    assert await Book.objects.filter(author=ann).acontains(books[0])
    assert not await Book.objects.filter(author=ann).acontains(books[2])
    assert_on_loop(thread_probe)


async def test_aexplain(thread_probe):
    await library()
    plan = await Book.objects.filter(pages__gt=150).aexplain()
    assert "Scan" in plan
    as_json = await Book.objects.all().aexplain(format="json", analyze=True)
    assert '"Actual Rows": 3' in as_json
    assert_on_loop(thread_probe)


# --- terminals that write: native, and undone by a rollback ---------------------


async def test_acreate(thread_probe):
    await Author.objects.acreate(name="kept")
    async with rolled_back():
        created = await Author.objects.acreate(name="undone")
        assert await Author.objects.filter(pk=created.pk).aexists()
    assert [a.name async for a in Author.objects.all()] == ["kept"]
    assert_on_loop(thread_probe)


async def test_aget_or_create(thread_probe):
    async with rolled_back():
        first, created = await Author.objects.aget_or_create(name="Ann", defaults={"bio": "x"})
        again, created_again = await Author.objects.aget_or_create(name="Ann")
        assert (created, created_again, again.pk, again.bio) == (True, False, first.pk, "x")
    assert await Author.objects.acount() == 0
    assert_on_loop(thread_probe)


async def test_aupdate_or_create(thread_probe):
    ann = await Author.objects.acreate(name="Ann", bio="old")
    async with rolled_back():
        updated, created = await Author.objects.aupdate_or_create(
            name="Ann", defaults={"bio": "new"}
        )
        assert (updated.pk, updated.bio, created) == (ann.pk, "new", False)
        fresh, created = await Author.objects.aupdate_or_create(
            name="Bob", defaults={"bio": "upd"}, create_defaults={"bio": "made"}
        )
        assert (fresh.bio, created) == ("made", True)
    assert [(a.name, a.bio) async for a in Author.objects.all()] == [("Ann", "old")]
    assert_on_loop(thread_probe)


async def test_abulk_create(thread_probe):
    async with rolled_back():
        made = await Author.objects.abulk_create([Author(name=f"a{i}") for i in range(5)])
        assert all(a.pk is not None for a in made)
        assert await Author.objects.acount() == 5
    assert await Author.objects.acount() == 0
    made = await Author.objects.abulk_create(
        [Author(name="a0")], update_conflicts=False, ignore_conflicts=True
    )
    assert await Author.objects.acount() == 1
    assert_on_loop(thread_probe)


async def test_abulk_update(thread_probe):
    _, _, books = await library()
    for book in books:
        book.pages += 1
    async with rolled_back():
        assert await Book.objects.abulk_update(books, ["pages"], batch_size=2) == 3
        assert await Book.objects.filter(pages__in=[101, 201, 301]).acount() == 3
    assert sorted([b async for b in Book.objects.values_list("pages", flat=True)]) == [
        100,
        200,
        300,
    ]
    assert_on_loop(thread_probe)


async def test_aupdate(thread_probe):
    ann, _, _ = await library()
    async with rolled_back():
        assert await Book.objects.filter(author=ann).aupdate(pages=F("pages") * 10) == 2
        assert await Book.objects.aaggregate(total=Sum("pages")) == {"total": 3300}
    assert await Book.objects.aaggregate(total=Sum("pages")) == {"total": 600}
    assert_on_loop(thread_probe)


async def test_adelete(thread_probe):
    ann, _, _ = await library()
    async with rolled_back():
        deleted = await Book.objects.filter(author=ann).adelete()
        assert deleted == (4, {"testapp.Book_tags": 2, "testapp.Book": 2})
        assert await Book.objects.acount() == 1
    assert await Book.objects.acount() == 3
    assert await Book.tags.through.objects.acount() == 2
    assert_on_loop(thread_probe)


# --- async for ------------------------------------------------------------------


async def test_async_for_models(thread_probe):
    await library()
    assert [b.title async for b in Book.objects.order_by("title")] == ["A", "B", "C"]
    assert_on_loop(thread_probe)


async def test_async_for_fills_the_result_cache(thread_probe):
    await library()
    qs = Book.objects.order_by("title")
    assert len([b async for b in qs]) == 3
    assert [b.title for b in qs] == ["A", "B", "C"]  # cached: no query, no error
    assert_on_loop(thread_probe)


async def test_async_for_values(thread_probe):
    await library()
    rows = [r async for r in Book.objects.order_by("title").values("title", "author__name")]
    assert rows == [
        {"title": "A", "author__name": "Ann"},
        {"title": "B", "author__name": "Ann"},
        {"title": "C", "author__name": "Bob"},
    ]
    assert_on_loop(thread_probe)


async def test_async_for_values_list(thread_probe):
    await library()
    pairs = [r async for r in Book.objects.order_by("title").values_list("title", "pages")]
    assert pairs == [("A", 100), ("B", 200), ("C", 300)]
    flat = [t async for t in Book.objects.order_by("-title").values_list("title", flat=True)]
    assert flat == ["C", "B", "A"]
    named = [r async for r in Book.objects.order_by("title").values_list("title", named=True)]
    assert named[0].title == "A"
    assert_on_loop(thread_probe)


async def test_async_for_select_related(thread_probe):
    await library()
    books = [b async for b in Book.objects.select_related("author").order_by("title")]
    # The related rows came with the query: reading them needs no bridge.
    assert [(b.title, b.author.name) for b in books] == [("A", "Ann"), ("B", "Ann"), ("C", "Bob")]
    assert_on_loop(thread_probe)


async def test_async_for_prefetch_related(thread_probe):
    await library()
    authors = [a async for a in Author.objects.prefetch_related("books__tags").order_by("name")]
    assert [(a.name, sorted(b.title for b in a.books.all())) for a in authors] == [
        ("Ann", ["A", "B"]),
        ("Bob", ["C"]),
    ]
    book_a = next(b for b in authors[0].books.all() if b.title == "A")
    assert sorted(t.name for t in book_a.tags.all()) == ["blue", "red"]
    assert_on_loop(thread_probe)


async def test_async_for_only_and_defer(thread_probe):
    await library()
    only = [b async for b in Book.objects.only("title").order_by("title")]
    assert [b.title for b in only] == ["A", "B", "C"]
    assert only[0].get_deferred_fields() == {"author_id", "pages", "published"}
    # A deferred field needs a query: outside a bridge that is refused, inside it works.
    with pytest.raises(SynchronousOnlyOperation):
        _ = only[0].pages
    assert await run_sync(lambda: only[0].pages) == 100
    deferred = [b async for b in Book.objects.defer("pages").order_by("title")]
    assert deferred[2].get_deferred_fields() == {"pages"}
    assert deferred[2].title == "C"
    assert_on_loop(thread_probe)


async def test_async_for_annotate(thread_probe):
    await library()
    rows = [
        (a.name, a.n, a.loud)
        async for a in Author.objects.annotate(n=Count("books"), loud=Upper("name")).order_by(
            "name"
        )
    ]
    assert rows == [("Ann", 2, "ANN"), ("Bob", 1, "BOB")]
    assert_on_loop(thread_probe)


async def test_async_for_union(thread_probe):
    await library()
    short = Book.objects.filter(pages__lt=150).values_list("title", flat=True)
    long = Book.objects.filter(pages__gt=250).values_list("title", flat=True)
    assert sorted([t async for t in short.union(long)]) == ["A", "C"]
    models = Book.objects.filter(title="A").union(Book.objects.filter(title="B")).order_by("title")
    assert [b.title async for b in models] == ["A", "B"]
    assert_on_loop(thread_probe)


async def test_async_for_raw(thread_probe):
    ann, _, _ = await library()
    table = Book._meta.db_table
    raw = Book.objects.raw(
        f"SELECT id, title, pages * 2 AS double FROM {table} WHERE author_id = %s ORDER BY title",
        [ann.pk],
    )
    assert [(b.title, b.double) async for b in raw] == [("A", 200), ("B", 400)]
    series = Author.objects.raw("SELECT g AS id, 'n' || g AS name FROM generate_series(1, 3) g")
    assert [a.name async for a in series] == ["n1", "n2", "n3"]
    assert_on_loop(thread_probe)


async def test_async_for_json_object_compiles_in_the_bridge(thread_probe):
    """SQL compilation that does I/O (JSONObject asks the server version) works in ``async for``."""
    await library()

    async def first_query_of_a_task() -> list[dict[str, object]]:
        wrapper = async_connections["default"].wrapper  # a new task: a fresh wrapper
        assert wrapper.connection is None
        assert "pg_version" not in wrapper.__dict__
        qs = Book.objects.annotate(
            j=JSONObject(name="title", author="author__name", pages=F("pages") + 1)
        ).order_by("title")
        rows = [b.j async for b in qs]
        assert "pg_version" in wrapper.__dict__  # read from the server while compiling
        return rows

    rows = await asyncio.create_task(first_query_of_a_task())
    assert rows[0] == {"name": "A", "author": "Ann", "pages": 101}
    assert len(rows) == 3
    assert_on_loop(thread_probe)


async def test_async_for_inside_a_transaction_sees_its_writes(thread_probe):
    async with rolled_back():
        await Author.objects.acreate(name="tx")
        assert [a.name async for a in Author.objects.all()] == ["tx"]
        assert [a.name async for a in Author.objects.raw("SELECT * FROM testapp_author")] == ["tx"]
    assert [a async for a in Author.objects.all()] == []
    assert_on_loop(thread_probe)
