"""The write side of the compiled SQL cache against Django's path.

Every shape runs through Django's own code (the cache's hooks taken out) and
through ours, call after call: the same statements (SQL text and typed
parameters, seen by an execute wrapper), the same instance (attributes,
``_state``), the same rows, the same ``pre_save``/``post_save`` kwargs, the
same warnings, or the same exception; the first call of a shape is a miss,
the later ones hits, and the shapes that must fall back never hit.
"""

from __future__ import annotations

import datetime as dt
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import django
import pytest
from django.db import IntegrityError, connections
from django.db.models import F, Model, Value
from django.db.models.functions import Lower
from django.db.models.query import QuerySet
from django.db.models.signals import post_save, pre_save
from django.test.utils import isolate_apps

from django_async_db import (
    _fastwrite,
    async_atomic,
    async_connections,
    clear_compiled_sql_cache,
    compiled_sql_cache_info,
    run_sync,
)
from tests.fastpath.test_harness import typed
from tests.testapp.models import Author, Book, Chapter, Event, Gadget, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

UTC = dt.UTC
# Fields with their own placeholder (Django 6.1's BinaryField ...): Gadget falls back.
GADGET_CACHED = not any(_fastwrite._has_placeholder(f) for f in Gadget._meta.concrete_fields)
# Django 5.2 compiles UPDATE ... SET "col" = NULL for None: such shapes fall back.
NULL_INLINED = django.VERSION < (6,)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_compiled_sql_cache()
    yield
    clear_compiled_sql_cache()


@contextmanager
def django_path() -> Iterator[None]:
    """Take the cache's write hooks out: Django's own ``_do_insert``/``_do_update``/``aupdate``."""
    saved = (Model._do_insert, Model._do_update, QuerySet.aupdate)  # type: ignore[attr-defined]
    Model._do_insert = _fastwrite._stock_do_insert  # type: ignore[attr-defined]
    Model._do_update = _fastwrite._stock_do_update  # type: ignore[attr-defined]
    QuerySet.aupdate = _fastwrite._stock_aupdate  # type: ignore[method-assign]
    try:
        yield
    finally:
        Model._do_insert, Model._do_update, QuerySet.aupdate = saved  # type: ignore[attr-defined]


def snapshot(obj: Any, *, pk: bool = True) -> Any:
    """Everything observable about a result; ``pk=False`` leaves the primary key's value out."""
    if isinstance(obj, BaseException):
        return ("raised", type(obj), str(obj))
    if not isinstance(obj, Model):
        return (type(obj), obj)
    attname = type(obj)._meta.pk.attname
    return (
        type(obj),
        list(obj.__dict__),
        {
            k: (type(v), v if pk or k != attname else "<pk>")
            for k, v in obj.__dict__.items()
            if k != "_state"
        },
        # Copies: the instance's caches may change after the snapshot.
        {k: dict(v) if isinstance(v, dict) else v for k, v in obj._state.__dict__.items()},
    )


class Recorder:
    """Statements, signals and warnings of one call."""

    def __init__(self, pk: bool) -> None:
        self.pk = pk
        self.statements: list[Any] = []
        self.signals: list[Any] = []

    def execute(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any
    ) -> Any:
        self.statements.append((sql, tuple(typed(p) for p in params or ()), many))
        return execute(sql, params, many, ctx)

    def record(self, sender: Any, instance: Any, signal: Any, **kwargs: Any) -> None:
        self.signals.append((signal is pre_save, sender, snapshot(instance, pk=self.pk), kwargs))


async def outcome(
    call: Callable[[], Awaitable[Any]], alias: str = "default", pk: bool = True
) -> Any:
    """Run ``call``; return its result snapshot, statements, signals and warnings."""
    recorder = Recorder(pk)
    pre_save.connect(recorder.record, weak=False)
    post_save.connect(recorder.record, weak=False)
    try:
        with (
            connections[alias].execute_wrapper(recorder.execute),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            try:
                result = await call()
                seen = snapshot(result, pk=pk)
            except Exception as exc:
                result, seen = exc, snapshot(exc)
    finally:
        pre_save.disconnect(recorder.record)
        post_save.disconnect(recorder.record)
    return result, (
        seen,
        recorder.statements,
        recorder.signals,
        [(w.category, str(w.message)) for w in caught],
    )


async def row(obj: Any, alias: str = "default") -> Any:
    """Return the row of ``obj`` as read back by Django (without the primary key)."""
    model = type(obj)._meta.concrete_model
    # Sync code in the bridge: not counted by the cache.
    fresh = await run_sync(lambda: model.objects.using(alias).filter(pk=obj.pk).first())
    if fresh is None:
        return None
    return {
        f.attname: getattr(fresh, f.attname)
        for f in model._meta.concrete_fields
        if not f.primary_key
    }


async def same_as_django(
    call: Callable[[], Awaitable[Any]],
    alias: str = "default",
    pk: bool = True,
    before: Callable[[], Awaitable[Any]] | None = None,
) -> Any:
    """Run ``call`` on Django's path, then on ours; assert they agree; return ours.

    ``before`` puts the database and instances back in the same state before each run.
    """
    with django_path():
        if before is not None:
            await before()
        theirs, expected = await outcome(call, alias, pk)
        their_row = await row(theirs, alias) if isinstance(theirs, Model) else None
        if before is not None:
            await before()
    ours, got = await outcome(call, alias, pk)
    assert got == expected
    if isinstance(ours, Model):
        assert await row(ours, alias) == their_row
    return ours


async def make_authors(alias: str = "default") -> tuple[Author, Author]:
    with django_path():
        ann = await Author.objects.using(alias).acreate(name="Ann", bio="first")
        bob = await Author.objects.using(alias).acreate(name="Bob", bio="")
    return ann, bob


# --- acreate() ---------------------------------------------------------------------

NOW = dt.datetime(2024, 5, 1, 12, tzinfo=UTC)

# (id, model, kwargs factory (authors, i) -> kwargs, cacheable)
# cacheable None: every call is a miss (Django raises before the shape is learnt).
CREATES: list[tuple[str, type[Model], Callable[[Any, int], dict[str, Any]], bool | None]] = [
    ("author", Author, lambda a, i: {"name": f"n{i}", "bio": "b"}, True),
    ("author, default bio", Author, lambda a, i: {"name": f"n{i}"}, True),
    ("author, no values", Author, lambda a, i: {}, True),
    (
        "book, every field",
        Book,
        lambda a, i: {"title": "t", "author_id": a[i % 2].pk, "pages": i, "published": NOW},
        True,
    ),
    ("book, author instance", Book, lambda a, i: {"title": "t", "author": a[i % 2]}, True),
    (
        "book, pages as str",
        Book,
        lambda a, i: {"title": "t", "author": a[0], "pages": str(i)},
        True,
    ),
    (
        "book, naive datetime (warns)",
        Book,
        lambda a, i: {"title": "t", "author": a[0], "published": dt.datetime(2024, 1, 1 + i)},
        True,
    ),
    ("event, None", Event, lambda a, i: {"task": i, "label": "x", "txid": None}, True),
    ("event, big int", Event, lambda a, i: {"task": i, "label": "x", "txid": 2**40 + i}, True),
    ("chapter (AsyncModelMixin), null FK", Chapter, lambda a, i: {"title": f"c{i}"}, True),
    (
        "gadget, every value type",
        Gadget,
        lambda a, i: {
            "uid": uuid.UUID(int=100 + i),
            "code": f"G{i}",
            "price": Decimal("1.25"),
            "ratio": 0.5,
            "data": {"i": i, "l": [1, 2]},
            "made": dt.date(2024, 1, 1),
            "opens": dt.time(8, 30),
            "seen": NOW,
            "blob": b"\x00\x01",
            "owner": a[0],
        },
        GADGET_CACHED,
    ),
    # Values Django compiles: Django's path, every time.
    ("expression value", Book, lambda a, i: {"title": Lower(Value("T")), "author": a[0]}, False),
    ("Value()", Author, lambda a, i: {"name": Value("v"), "bio": ""}, False),
    ("F() (an error)", Book, lambda a, i: {"title": F("title"), "author": a[0]}, False),
    ("bad value (an error)", Book, lambda a, i: {"title": "t", "author": a[0], "pages": "x"}, None),
]


@pytest.mark.parametrize(
    ("model", "kwargs", "cacheable"),
    [pytest.param(m, k, c, id=name) for name, m, k, c in CREATES],
)
async def test_acreate_same_as_django(
    model: type[Model], kwargs: Callable[[Any, int], dict[str, Any]], cacheable: bool | None
) -> None:
    authors = await make_authors()

    async def delete_created() -> None:  # unique values: each path creates the same row
        if model is not Author:
            await run_sync(lambda: model.objects.all().delete())  # type: ignore[attr-defined]

    for i in range(4):
        await same_as_django(
            lambda i=i: model.objects.acreate(**kwargs(authors, i)),  # type: ignore[attr-defined]
            pk=False,
            before=delete_created,
        )
    info = compiled_sql_cache_info()
    if cacheable:
        assert (info.misses, info.hits) == (1, 3)
    else:
        assert info.hits == 0


async def test_acreate_misses_then_hits() -> None:
    authors = await make_authors()
    for i in range(3):
        await same_as_django(
            lambda i=i: Book.objects.acreate(title="t", author=authors[0], pages=i), pk=False
        )
    assert compiled_sql_cache_info()[:4] == (2, 1, 0, 1)


async def test_explicit_pk_and_force_insert() -> None:
    async def create(pk: int) -> Author:
        return await Author.objects.acreate(id=pk, name="x")

    for pk in (9001, 9002, 9003):
        with django_path():
            _, expected = await outcome(lambda pk=pk: create(pk))
        await Author.objects.filter(pk=pk).adelete()
        _, got = await outcome(lambda pk=pk: create(pk))
        assert got == expected
    assert compiled_sql_cache_info().hits == 2
    # The same primary key again: Django's IntegrityError, from both paths.
    with django_path():
        _, expected = await outcome(lambda: create(9003))
    _, got = await outcome(lambda: create(9003))
    assert got[0][:2] == expected[0][:2] == ("raised", IntegrityError)
    assert got[1] == expected[1]


async def test_auto_now_runs_pre_save_as_often_as_django(monkeypatch: pytest.MonkeyPatch) -> None:
    authors = await make_authors()
    field = Book._meta.get_field("published")
    monkeypatch.setattr(field, "auto_now", True)
    calls: list[str] = []
    stock_pre_save = type(field).pre_save

    def counting_pre_save(instance: Any, add: bool) -> Any:
        calls.append("pre_save")
        return stock_pre_save(field, instance, add)

    monkeypatch.setattr(field, "pre_save", counting_pre_save)
    for path in ("django", "ours", "ours", "ours"):
        calls.clear()
        if path == "django":
            with django_path():
                book = await Book.objects.acreate(title="t", author=authors[0])
            django_calls = len(calls)
        else:
            book = await Book.objects.acreate(title="t", author=authors[0])
            assert len(calls) == django_calls
        assert book.published is not None
        assert (await row(book))["published"] == book.published
        book.title = "u"
        calls.clear()
        await book.asave()
        assert len(calls) == 1
        assert (await row(book))["published"] == book.published
    assert compiled_sql_cache_info().hits >= 4


async def test_signals_see_the_same_kwargs() -> None:
    authors = await make_authors()
    book = None
    for i in range(3):

        async def create(i: int = i) -> Book:
            return await Book.objects.acreate(title=f"s{i}", author=authors[0])

        with django_path():
            _, expected = await outcome(create, pk=False)
        book, got = await outcome(create, pk=False)
        assert got == expected
        (pre, _, _, pre_kwargs), (post, _, _, post_kwargs) = got[2]
        assert (pre, post) == (True, False)
        assert pre_kwargs == {"raw": False, "using": "default", "update_fields": None}
        assert post_kwargs == {**pre_kwargs, "created": True}
        assert (book._state.adding, book._state.db) == (False, "default")
    assert book is not None
    await same_as_django(lambda: book.asave(update_fields=["title"]))
    assert compiled_sql_cache_info()[:2] == (2, 2)


@isolate_apps("tests.testapp")
async def test_proxy_model() -> None:
    class Pen(Author):
        class Meta:
            app_label = "testapp"
            proxy = True

    for i in range(3):
        pen = await same_as_django(lambda i=i: Pen.objects.acreate(name=f"p{i}"), pk=False)
        assert type(pen) is Pen
        pen.bio = "x"
        await same_as_django(pen.asave)
    assert compiled_sql_cache_info().hits >= 4


@isolate_apps("tests.testapp")
def test_multi_table_inheritance_is_not_cached() -> None:
    from django.db import models

    class Place(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    class Shop(Place):
        kind = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    shop = Shop(name="a", kind="b")
    parent_fields = [f for f in Place._meta.local_concrete_fields if not f.primary_key]
    child_fields = list(Shop._meta.local_concrete_fields)
    # The child's row, and the child's INSERT into its parent's table.
    assert not _fastwrite._insert_cacheable(shop, Shop._base_manager, child_fields, [], "default")
    assert not _fastwrite._insert_cacheable(shop, Place._base_manager, parent_fields, [], "default")
    place = Place(name="a")
    assert _fastwrite._insert_cacheable(place, Place._base_manager, parent_fields, [], "default")


# --- asave() -------------------------------------------------------------------------


async def test_asave_update_shapes_same_as_django() -> None:
    authors = await make_authors()
    with django_path():
        book = await Book.objects.acreate(title="t", author=authors[0], pages=1)
    for i in range(3):
        book.title = f"t{i}"
        book.pages = i
        await same_as_django(book.asave)
        await same_as_django(lambda: book.asave(update_fields=["title"]))
        await same_as_django(lambda: book.asave(update_fields=["pages", "author"]))
        await same_as_django(lambda: book.asave(force_update=True))
        book.published = NOW if i % 2 else None
        await same_as_django(book.asave)
    # Four shapes: every field with published None, with a datetime, and two
    # update_fields; force_update is the first two's. Django 5.2: the first falls back.
    assert compiled_sql_cache_info()[:2] == ((6, 4) if NULL_INLINED else (11, 4))
    loaded = await Book.objects.aget(pk=book.pk)
    assert (loaded.title, loaded.pages, loaded.published) == ("t2", 2, None)


async def test_asave_new_instances_and_deleted_rows() -> None:
    authors = await make_authors()
    for i in range(3):
        await same_as_django(lambda i=i: Book(title=f"n{i}", author=authors[1]).asave(), pk=False)
    # A row deleted behind the instance's back: UPDATE of no row, then INSERT.
    for _ in range(3):
        book = await Book.objects.acreate(title="gone", author=authors[0])

        async def delete(book: Book = book) -> None:
            await run_sync(lambda: Book.objects.filter(pk=book.pk).delete())

        await same_as_django(book.asave, before=delete)  # UPDATE of no row, then INSERT
        await same_as_django(lambda book=book: book.asave(update_fields=["title"]), before=delete)
    info = compiled_sql_cache_info()
    assert info.hits >= 8


async def test_asave_with_expressions_falls_back() -> None:
    ann, _ = await make_authors()
    with django_path():
        book = await Book.objects.acreate(title="t", author=ann, pages=1)

    async def reset() -> None:
        await run_sync(lambda: Book.objects.filter(pk=book.pk).update(pages=1))
        book.pages = F("pages") + 1

    for _ in range(3):
        await same_as_django(book.asave, before=reset)
    assert (await run_sync(lambda: Book.objects.get(pk=book.pk))).pages == 2
    assert compiled_sql_cache_info().hits == 0


async def test_select_on_save_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    ann, _ = await make_authors()
    monkeypatch.setattr(Author._meta, "select_on_save", True)
    for i in range(3):
        ann.name = f"a{i}"
        await same_as_django(ann.asave)
    await same_as_django(lambda: ann.asave(update_fields=["name"]))  # forced: cacheable
    assert compiled_sql_cache_info()[:3] == (0, 1, 3)


async def test_other_alias_has_its_own_entries() -> None:
    ann, _ = await make_authors()
    other, _ = await make_authors("other")
    for i in range(3):
        await same_as_django(
            lambda i=i: Author.objects.using("other").acreate(name=f"o{i}"), "other", pk=False
        )
        await same_as_django(lambda i=i: Author.objects.acreate(name=f"d{i}"), pk=False)
        other.name = f"o{i}"
        await same_as_django(other.asave, "other")
        ann.name = f"d{i}"
        await same_as_django(ann.asave)
    info = compiled_sql_cache_info()
    assert (info.hits, info.misses, info.size) == (8, 4, 4)  # INSERT and UPDATE, per alias
    assert (await Author.objects.using("other").aget(pk=other.pk)).name == "o2"
    assert (await Author.objects.aget(pk=ann.pk)).name == "d2"


# --- filter(**lookups).aupdate(**values) ---------------------------------------------

UPDATES: list[
    tuple[str, Callable[[Any], QuerySet[Any]], Callable[[Any, int], dict[str, Any]], bool | None]
] = [
    ("pk", lambda a: Author.objects.filter(pk=a[0].pk), lambda a, i: {"name": f"x{i}"}, True),
    (
        "name, many rows",
        lambda a: Author.objects.filter(bio="b"),
        lambda a, i: {"name": f"y{i}"},
        True,
    ),
    (
        "fk, two values, None",
        lambda a: Book.objects.filter(author_id=a[0].pk),
        lambda a, i: {"pages": i, "published": None},
        not NULL_INLINED,
    ),
    ("no match", lambda a: Author.objects.filter(pk=0), lambda a, i: {"name": "z"}, True),
    (
        "pk out of range",
        lambda a: Author.objects.filter(pk=2**70),
        lambda a, i: {"name": "z"},
        None,
    ),
    (
        "bool filter",
        lambda a: Gadget.objects.filter(active=True),
        lambda a, i: {"ratio": i / 2},
        True,
    ),
    (
        "F()",
        lambda a: Book.objects.filter(author_id=a[0].pk),
        lambda a, i: {"pages": F("pages") + 1},
        False,
    ),
    (
        "instance value",
        lambda a: Book.objects.filter(pages=1),
        lambda a, i: {"author": a[1]},
        False,
    ),
    ("unknown field", lambda a: Author.objects.filter(bio="b"), lambda a, i: {"nope": 1}, False),
    ("bad value", lambda a: Book.objects.filter(pages=1), lambda a, i: {"pages": "x"}, None),
]


@pytest.mark.parametrize(
    ("make_qs", "values", "cacheable"),
    [pytest.param(q, v, c, id=name) for name, q, v, c in UPDATES],
)
async def test_aupdate_same_as_django(
    make_qs: Callable[[Any], QuerySet[Any]],
    values: Callable[[Any, int], dict[str, Any]],
    cacheable: bool | None,
) -> None:
    authors = await make_authors()
    with django_path():
        for i in range(3):
            await Author.objects.acreate(name=f"b{i}", bio="b")
            await Book.objects.acreate(title="t", author=authors[0], pages=1)
        await Gadget.objects.acreate(uid=uuid.uuid4(), code="g", blob=b"")
    clear_compiled_sql_cache()
    for i in range(4):
        # The first filter() of a shape is Django's own; later ones are deferred.
        await same_as_django(lambda i=i: make_qs(authors).aupdate(**values(authors, i)))
    info = compiled_sql_cache_info()
    if cacheable:
        assert (info.misses, info.hits) == (1, 3)
    else:
        assert info.hits == 0


async def test_aupdate_resets_the_result_cache_and_returns_the_count() -> None:
    await make_authors()
    Author.objects.filter(bio="")  # learn the filter() shape
    for i in range(3):
        qs = Author.objects.filter(bio="")
        assert await qs.aupdate(name=f"r{i}") == 1
        assert qs._result_cache is None  # type: ignore[attr-defined]
        assert qs._for_write  # type: ignore[attr-defined]
    assert compiled_sql_cache_info().hits == 2
    assert [a.name async for a in Author.objects.filter(bio="")] == ["r2"]


# --- transactions, errors, opt-out ----------------------------------------------------


async def test_integrity_errors_mark_the_block_for_rollback_as_django_does() -> None:
    await make_authors()
    await Tag.objects.acreate(name="red")
    Tag.objects.filter(name="red")  # learn the filter() shape
    for path in ("django", "ours", "ours", "ours"):
        with django_path() if path == "django" else _nothing():
            tag = await Tag.objects.acreate(name="blue")
            for attempt in (
                lambda: Tag.objects.acreate(name="red"),
                lambda: Tag.objects.filter(name="blue").aupdate(name="red"),
                lambda tag=tag: _rename(tag, "red"),
            ):
                async with async_atomic():
                    with pytest.raises(IntegrityError):
                        await attempt()
                    # Django's mark_for_rollback_on_error: the block rolls back on exit.
                    assert async_connections["default"].get_rollback()
            await run_sync(lambda tag=tag: Tag.objects.filter(pk=tag.pk).delete())
    assert compiled_sql_cache_info().hits >= 6


async def _rename(tag: Tag, name: str) -> None:
    tag.name = name
    await tag.asave()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


async def test_bad_value_inside_async_atomic_marks_rollback() -> None:
    ann, _ = await make_authors()
    for _ in range(2):
        await Book.objects.acreate(title="t", author=ann, pages=1)  # a hit, then errors
    for path in ("django", "ours", "ours"):
        with django_path() if path == "django" else _nothing():
            async with async_atomic():
                with pytest.raises(ValueError, match="expected a number"):
                    await Book.objects.acreate(title="t", author=ann, pages="x")
                assert async_connections["default"].get_rollback()
            book = await Book.objects.acreate(title="t", author=ann, pages=1)
            book.pages = "y"
            async with async_atomic():
                with pytest.raises(ValueError, match="expected a number"):
                    await book.asave()
                assert async_connections["default"].get_rollback()


async def test_writes_in_a_block_roll_back_with_it() -> None:
    ann, _ = await make_authors()
    for _ in range(3):
        async with async_atomic():
            book = await Book.objects.acreate(title="t", author=ann, published=NOW)
            book.title = "u"
            await book.asave()
            async_connections["default"].set_rollback(True)
        assert not await Book.objects.filter(pk=book.pk).aexists()
    assert compiled_sql_cache_info().hits >= 4


async def test_opt_out_per_alias(db_options: dict[str, Any]) -> None:
    db_options["compiled_sql_cache"] = False
    ann, _ = await make_authors()
    for i in range(3):
        await same_as_django(lambda i=i: Author.objects.acreate(name=f"o{i}"), pk=False)
        ann.name = f"o{i}"
        await same_as_django(ann.asave)
        await same_as_django(lambda i=i: Author.objects.filter(name=f"o{i}").aupdate(bio="x"))
    assert compiled_sql_cache_info()[:4] == (0, 0, 0, 0)


async def test_sync_code_in_the_bridge_uses_the_cache() -> None:
    await run_sync(lambda: Author.objects.create(name="s"))
    await run_sync(lambda: Author.objects.create(name="s"))
    assert compiled_sql_cache_info()[:2] == (1, 1)


def test_sync_code_takes_djangos_path() -> None:
    for _ in range(2):
        Author.objects.create(name="t")
    assert compiled_sql_cache_info()[:4] == (0, 0, 0, 0)


async def test_clear_and_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from django_async_db import _fastpath

    authors = await make_authors()
    monkeypatch.setattr(_fastpath, "MAX_ENTRIES", 2)
    await Author.objects.acreate(name="a")
    await Book.objects.acreate(title="t", author=authors[0])
    await Event.objects.acreate(task=1, label="x")
    assert compiled_sql_cache_info().size == 2
    clear_compiled_sql_cache()
    assert compiled_sql_cache_info()[:4] == (0, 0, 0, 0)
