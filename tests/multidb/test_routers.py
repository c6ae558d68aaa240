"""Django database routers decide the alias of every async ORM path."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.models import Count

from django_async_db import async_atomic, run_sync
from tests.testapp.models import Author, Book, Chapter, Tag

from .conftest import ALIASES, APPS, ReadOtherWriteDefault, TestappOnOther, names_on

pytestmark = pytest.mark.django_db(transaction=True, databases=ALIASES, available_apps=APPS)


@pytest.fixture
def route_testapp_to_other(settings):
    settings.DATABASE_ROUTERS = [TestappOnOther()]


@pytest.fixture
def read_other_write_default(settings):
    settings.DATABASE_ROUTERS = [ReadOtherWriteDefault()]


@pytest.mark.usefixtures("route_testapp_to_other")
async def test_queryset_and_model_paths_follow_the_router():
    ann = await Author.objects.acreate(name="ann")
    assert ann._state.db == "other"
    await Author.objects.abulk_create([Author(name="bea"), Author(name="cy")])
    author, created = await Author.objects.aget_or_create(name="dee")
    assert created
    await Author.objects.aupdate_or_create(name="eve", defaults={"bio": "x"})
    assert await names_on("other") == ["ann", "bea", "cy", "dee", "eve"]
    assert await names_on("default") == []

    assert (await Author.objects.aget(name="ann")).pk == ann.pk
    assert await Author.objects.acount() == 5
    assert await Author.objects.filter(name="cy").aexists()
    assert (await Author.objects.order_by("name").afirst()).name == "ann"
    assert (await Author.objects.order_by("name").alast()).name == "eve"
    assert await Author.objects.acontains(ann)
    assert set(await Author.objects.ain_bulk([ann.pk])) == {ann.pk}
    assert [a.name async for a in Author.objects.order_by("name")][:2] == ["ann", "bea"]
    assert [n async for n in Author.objects.values_list("name", flat=True).aiterator()]
    assert await Author.objects.aaggregate(n=Count("id")) == {"n": 5}

    ann.bio = "changed"
    await ann.asave()
    await Author.objects.filter(name="bea").aupdate(bio="updated")
    bea = await Author.objects.aget(name="bea")
    bea.bio = "bulk"
    await Author.objects.abulk_update([bea], ["bio"])
    await ann.arefresh_from_db()
    assert ann.bio == "changed"
    await Author.objects.filter(name="cy").adelete()
    await author.adelete()
    assert await names_on("other") == ["ann", "bea", "eve"]
    assert await names_on("default") == []


@pytest.mark.usefixtures("route_testapp_to_other")
async def test_related_managers_and_prefetch_follow_the_router():
    ann = await Author.objects.acreate(name="ann")
    book = await ann.books.acreate(title="b1")
    assert book._state.db == "other"
    tag = await Tag.objects.acreate(name="t")
    await book.tags.aadd(tag)
    assert [t.name async for t in book.tags.all()] == ["t"]
    fetched = await Book.objects.select_related("author").prefetch_related("tags").aget()
    assert fetched.author.name == "ann"
    assert [t.name for t in fetched.tags.all()] == ["t"]
    await book.tags.aremove(tag)
    assert await book.tags.acount() == 0
    await book.tags.aset([tag])
    assert await tag.books.acount() == 1
    await tag.books.aclear()
    assert await Book.objects.acount() == 1
    assert await Book.objects.using("default").acount() == 0
    assert await Tag.objects.using("default").acount() == 0


@pytest.mark.usefixtures("route_testapp_to_other")
async def test_awaitable_relations_follow_the_router():
    author = await Author.objects.acreate(name="ann")
    book = await Book.objects.acreate(title="b", author=author)
    chapter = await Chapter.objects.acreate(title="c", book=book)
    fetched = await Chapter.objects.aget(pk=chapter.pk)
    assert fetched._state.db == "other"
    assert (await fetched.abook).title == "b"
    await fetched.acites.aadd(book)
    assert [b.title async for b in fetched.cites.all()] == ["b"]
    assert await Chapter.objects.using("default").acount() == 0


@pytest.mark.usefixtures("route_testapp_to_other")
async def test_sync_orm_code_in_the_bridge_follows_the_router():
    def sync_work() -> int:
        Author.objects.create(name="sync")
        return Author.objects.count()

    async with async_atomic("other"):
        assert await run_sync(sync_work) == 1
    assert await names_on("other") == ["sync"]


@pytest.mark.usefixtures("read_other_write_default")
async def test_reads_and_writes_go_where_the_router_says():
    ann = await Author.objects.acreate(name="ann")
    assert ann._state.db == "default"
    assert await names_on("default") == ["ann"]
    # Reads go to "other", where the row is not.
    with pytest.raises(Author.DoesNotExist):
        await Author.objects.aget(name="ann")
    assert await Author.objects.acount() == 0
    assert [a async for a in Author.objects.all()] == []
    # Write paths read on the write alias, as in Django.
    same, created = await Author.objects.aget_or_create(name="ann")
    assert not created
    assert same.pk == ann.pk
    assert await Author.objects.filter(name="ann").aupdate(bio="x") == 1
    # refresh_from_db() reads on the router's read alias too (Django's rule);
    # using= picks the alias explicitly.
    with pytest.raises(Author.DoesNotExist):
        await ann.arefresh_from_db()
    await ann.arefresh_from_db(using="default")
    assert ann.bio == "x"


@pytest.mark.usefixtures("read_other_write_default")
async def test_the_routed_write_alias_is_the_one_to_wrap_in_async_atomic():
    async def block() -> None:
        async with async_atomic(using="default"):
            await Author.objects.acreate(name="rolled back")
            1 / 0  # noqa: B018

    with pytest.raises(ZeroDivisionError):
        await block()
    assert await names_on("default") == []
    assert connection.alias == "default"
