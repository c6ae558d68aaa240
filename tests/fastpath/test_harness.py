"""The compiled SQL cache against Django's path: same SQL, same parameters, same objects.

Every shape runs through Django's own ``QuerySet.get()`` (in the bridge) and
through ``aget()`` three times with different values: the first call of a
cacheable shape fills the cache, the later ones are hits. Each run records
the statements reaching the cursor (through an execute wrapper) and a full
snapshot of the result: the instance's attributes, its ``_state`` and
deferred fields, or the exception's type and message.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections
from django.db.models import Model, Q
from django.db.models.query import QuerySet
from django.test.utils import isolate_apps

from django_async_db import (
    _fastpath,
    _fastpath_rows,
    clear_compiled_sql_cache,
    compiled_sql_cache_info,
    run_sync,
)
from tests.testapp.models import Author, Book, Chapter, ChapterNote, Event, Gadget, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

UTC = dt.UTC
HAS_FETCH_MODES = hasattr(QuerySet, "fetch_mode")


async def make_data(using: str = "default") -> dict[str, Any]:
    """Create a small library, gadgets of every value type, and 25 events."""
    ann = await Author.objects.using(using).acreate(name="Ann", bio="first")
    bob = await Author.objects.using(using).acreate(name="Bob", bio="")
    await Author.objects.using(using).acreate(name="Ann", bio="second")  # two Anns
    book = await Book.objects.using(using).acreate(
        title="A", author=ann, pages=100, published=dt.datetime(2024, 1, 1, tzinfo=UTC)
    )
    await Book.objects.using(using).acreate(title="B", author=bob, pages=200)
    await Tag.objects.using(using).acreate(name="red")
    chapter = await Chapter.objects.using(using).acreate(title="one", book=book)
    first = await ChapterNote.objects.using(using).acreate(chapter=chapter, text="a")
    await ChapterNote.objects.using(using).acreate(chapter=chapter, text="b", previous=first)
    gadgets = [
        await Gadget.objects.using(using).acreate(
            uid=uuid.UUID(int=i + 1),
            code=f"CODE{i}",
            active=i % 2 == 0,
            price=Decimal(f"{i}.50"),
            ratio=i / 4,
            data={"i": i, "tags": ["x"] * i},
            made=dt.date(2024, 1, i + 1),
            opens=dt.time(8 + i, 30),
            seen=dt.datetime(2024, 1, i + 1, 12, tzinfo=UTC),
            blob=bytes([i]) * 3,
            owner=ann if i else None,
        )
        for i in range(3)
    ]
    for i in range(25):
        await Event.objects.using(using).acreate(task=i % 2, label="many", txid=None)
    clear_compiled_sql_cache()  # the writes above filled its write side: count reads only
    return {"ann": ann, "bob": bob, "book": book, "first": first, "gadgets": gadgets}


def snapshot(obj: Any) -> Any:
    """Return everything observable about a result (or an exception)."""
    if isinstance(obj, BaseException):
        return ("raised", type(obj), str(obj))
    if obj is None or type(obj) in (bool, int):  # first() of nothing, exists(), count()
        return (type(obj), obj)
    assert isinstance(obj, Model)
    state = dict(obj._state.__dict__)
    peers = state.pop("peers", None)
    return (
        type(obj),
        list(obj.__dict__),  # attribute order too
        {k: (type(v), v) for k, v in obj.__dict__.items() if k != "_state"},
        state,
        None if peers is None else [p() is obj for p in peers],
        obj.get_deferred_fields(),
    )


def typed(param: Any) -> tuple[type, Any]:
    """Return a comparable form of a parameter (psycopg's Binary/Jsonb wrappers have no ==)."""
    return (type(param), getattr(param, "obj", param))


@contextmanager
def statements(alias: str) -> Iterator[list[Any]]:
    """Record ``(sql, typed params, many)`` of each statement the alias's cursor runs."""
    seen: list[Any] = []

    def record(execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any) -> Any:
        seen.append((sql, type(params), tuple(typed(p) for p in params or ()), many))
        return execute(sql, params, many, ctx)

    with connections[alias].execute_wrapper(record):
        yield seen


async def outcome(alias: str, call: Callable[[], Any]) -> tuple[Any, list[Any]]:
    with statements(alias) as seen:
        try:
            result = snapshot(await call())
        except Exception as exc:
            result = snapshot(exc)
    return result, seen


async def assert_same_as_django(
    make_qs: Callable[[], QuerySet[Any]], kwargs: dict[str, Any], alias: str = "default"
) -> None:
    """Assert ``make_qs().aget(**kwargs)`` and Django's ``make_qs().get(**kwargs)`` agree."""
    django = await outcome(alias, lambda: run_sync(make_qs().get, **kwargs))
    ours = await outcome(alias, lambda: make_qs().aget(**kwargs))
    assert ours == django
    assert len(ours[1]) <= 1  # no hidden extra query (none when a value is rejected)
    assert await direct_outcome(lambda: make_qs().aget(**kwargs)) == django[0]


async def direct_outcome(call: Callable[[], Any], snap: Callable[[Any], Any] = snapshot) -> Any:
    """Return ``snap`` of ``call()`` run without an execute wrapper.

    Without one, a hit runs its query in plain async code (``_fastpath._hit``'s
    direct road): every hit of this call must have.
    """
    hits, direct = compiled_sql_cache_info().hits, _fastpath._direct_hits
    try:
        result = snap(await call())
    except Exception as exc:
        result = snap(exc)
    new_hits = compiled_sql_cache_info().hits - hits
    assert _fastpath._direct_hits - direct == new_hits
    return result


def gadget_values(data: dict[str, Any], field: str) -> list[Any]:
    return [getattr(g, field) for g in data["gadgets"]]


# (id, queryset factory, kwargs factory: data -> value sets, cacheable)
SHAPES: list[tuple[str, Callable[[], QuerySet[Any]], Callable[[dict[str, Any]], list[Any]], bool]]
SHAPES = [
    # Pristine manager querysets, equality lookups: the cache's shapes.
    (
        "pk",
        Author.objects.all,
        lambda d: [{"pk": d["ann"].pk}, {"pk": d["bob"].pk}, {"pk": -1}],
        True,
    ),
    ("id", Author.objects.all, lambda d: [{"id": d["ann"].pk}, {"id": d["bob"].pk}], True),
    (
        "pk out of the column's range",
        Author.objects.all,
        lambda d: [{"pk": d["ann"].pk}, {"pk": 2**63}, {"pk": -(2**63) - 1}, {"pk": 2**70}],
        True,
    ),
    (
        "pk__exact",
        Author.objects.all,
        lambda d: [{"pk__exact": d["bob"].pk}, {"pk__exact": 0}],
        True,
    ),
    (
        "pk as str",
        Author.objects.all,
        lambda d: [{"pk": str(d["ann"].pk)}, {"pk": "abc"}, {"pk": "0"}],
        True,
    ),
    (
        "name, MultipleObjectsReturned",
        Author.objects.all,
        lambda d: [{"name": "Bob"}, {"name": "Ann"}, {"name": "nobody"}],
        True,
    ),
    (
        "two kwargs",
        Author.objects.all,
        lambda d: [
            {"name": "Ann", "bio": "first"},
            {"name": "Ann", "bio": "second"},
            {"name": "Bob", "bio": "x"},
        ],
        True,
    ),
    (
        "two kwargs, reversed",
        Author.objects.all,
        lambda d: [{"bio": "first", "name": "Ann"}, {"bio": "", "name": "Bob"}],
        True,
    ),
    (
        "more than 20",
        Event.objects.all,
        lambda d: [{"label": "many"}, {"label": "none"}, {"label": "many"}],
        True,
    ),
    (
        "fk attname",
        Book.objects.all,
        lambda d: [{"author_id": d["ann"].pk}, {"author_id": d["bob"].pk}],
        True,
    ),
    (
        "fk name with a pk value",
        Book.objects.all,
        lambda d: [{"author": d["ann"].pk}, {"author": d["bob"].pk}, {"author": 0}],
        True,
    ),
    (
        "fk and int",
        Book.objects.all,
        lambda d: [
            {"author_id": d["ann"].pk, "pages": 100},
            {"author_id": d["bob"].pk, "pages": 100},
        ],
        True,
    ),
    (
        "datetime",
        Book.objects.all,
        lambda d: [
            {"published": dt.datetime(2024, 1, 1, tzinfo=UTC)},
            {"published": dt.datetime(2024, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))},
        ],
        True,
    ),
    ("unique str", Tag.objects.all, lambda d: [{"name": "red"}, {"name": "blue"}], True),
    (
        "self one-to-one attname",
        ChapterNote.objects.all,
        lambda d: [{"previous_id": d["first"].pk}, {"previous_id": 0}],
        True,
    ),
    (
        "AsyncModelMixin model",
        Chapter.objects.all,
        lambda d: [{"title": "one"}, {"title": "two"}],
        True,
    ),
    ("uuid", Gadget.objects.all, lambda d: [{"uid": u} for u in gadget_values(d, "uid")], True),
    (
        "uuid as str",
        Gadget.objects.all,
        lambda d: [{"uid": str(u)} for u in gadget_values(d, "uid")],
        True,
    ),
    (
        "from_db_value converter",
        Gadget.objects.all,
        lambda d: [{"code": "CODE1"}, {"code": "CODE2"}, {"code": "code1"}],
        True,
    ),
    (
        "decimal",
        Gadget.objects.all,
        lambda d: [{"price": Decimal("1.50")}, {"price": Decimal("2.5")}],
        True,
    ),
    ("decimal as int", Gadget.objects.all, lambda d: [{"price": 0}, {"price": 1}], True),
    (
        "float",
        Gadget.objects.all,
        lambda d: [{"ratio": 0.25}, {"ratio": 0.5}, {"ratio": 0.0}],
        True,
    ),
    ("date", Gadget.objects.all, lambda d: [{"made": m} for m in gadget_values(d, "made")], True),
    (
        "date as datetime-free str",
        Gadget.objects.all,
        lambda d: [{"made": "2024-01-02"}, {"made": "2024-01-03"}],
        True,
    ),
    ("time", Gadget.objects.all, lambda d: [{"opens": t} for t in gadget_values(d, "opens")], True),
    (
        "aware datetime",
        Gadget.objects.all,
        lambda d: [{"seen": s} for s in gadget_values(d, "seen")],
        True,
    ),
    (
        "bytes",
        Gadget.objects.all,
        lambda d: [{"blob": b"\x01\x01\x01"}, {"blob": b"\x02\x02\x02"}],
        True,
    ),
    ("bool", Gadget.objects.all, lambda d: [{"active": False}, {"active": False}], True),
    (
        "bool and pk",
        Gadget.objects.all,
        lambda d: [{"active": True, "pk": g.pk} for g in d["gadgets"]],
        True,
    ),
    (
        "fk to nullable owner",
        Gadget.objects.all,
        lambda d: [{"owner_id": d["ann"].pk}, {"owner_id": d["bob"].pk}],
        True,
    ),
    (
        "json dict",
        Gadget.objects.all,
        lambda d: [{"data": {"i": 0, "tags": []}}, {"data": {"i": 9}}],
        False,
    ),
    (
        "using()",
        lambda: Author.objects.using("default"),
        lambda d: [{"pk": d["ann"].pk}, {"pk": d["bob"].pk}],
        True,
    ),
    # Everything else takes Django's path, with the same results.
    ("None value", Book.objects.all, lambda d: [{"published": None}, {"published": None}], False),
    (
        "model instance",
        Book.objects.all,
        lambda d: [{"author": d["ann"]}, {"author": d["bob"]}],
        False,
    ),
    (
        "related path",
        Book.objects.all,
        lambda d: [{"author__name": "Bob"}, {"author__name": "Ann"}],
        False,
    ),
    (
        "__in",
        Author.objects.all,
        lambda d: [{"pk__in": [d["ann"].pk]}, {"pk__in": [d["bob"].pk, 0]}],
        False,
    ),
    (
        "iexact",
        Author.objects.all,
        lambda d: [{"name__iexact": "bob"}, {"name__iexact": "BOB"}],
        True,
    ),
    (
        "prior filter",
        lambda: Author.objects.filter(name="Ann"),
        lambda d: [{"pk": d["ann"].pk}, {"pk": d["bob"].pk}],
        True,
    ),
    (
        "only()",
        lambda: Book.objects.only("title"),
        lambda d: [{"pk": d["book"].pk}, {"pk": 0}],
        False,
    ),
    ("defer()", lambda: Book.objects.defer("title"), lambda d: [{"pk": d["book"].pk}], False),
    (
        "select_related()",
        lambda: Book.objects.select_related("author"),
        lambda d: [{"pk": d["book"].pk}],
        True,
    ),
    (
        "order_by()",
        lambda: Author.objects.order_by("-name"),
        lambda d: [{"name": "Bob"}, {"name": "Ann"}],
        True,
    ),
    (
        "annotate()",
        lambda: Author.objects.annotate(n=Q(name="Ann")),
        lambda d: [{"pk": d["bob"].pk}],
        False,
    ),
    ("values()", lambda: Author.objects.values("name"), lambda d: [{"pk": d["bob"].pk}], False),
    ("distinct()", lambda: Author.objects.distinct(), lambda d: [{"pk": d["bob"].pk}], False),
    ("none()", Author.objects.none, lambda d: [{"pk": d["bob"].pk}], False),
    (
        "sticky filter",
        lambda: Author.objects.get_queryset()._next_is_sticky(),
        lambda d: [{"pk": d["bob"].pk}],
        False,
    ),
]
if HAS_FETCH_MODES:
    from django.db.models import FETCH_PEERS

    SHAPES.append(
        (
            "FETCH_PEERS",
            lambda: Author.objects.fetch_mode(FETCH_PEERS),
            lambda d: [{"pk": d["ann"].pk}, {"pk": d["bob"].pk}],
            True,
        )
    )


SHAPE_PARAMS = [pytest.param(qs, values, ok, id=name) for name, qs, values, ok in SHAPES]


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_compiled_sql_cache()
    yield
    clear_compiled_sql_cache()


@pytest.mark.parametrize(("make_qs", "values", "cacheable"), SHAPE_PARAMS)
async def test_same_sql_params_and_objects_as_django(
    make_qs: Callable[[], QuerySet[Any]],
    values: Callable[[dict[str, Any]], list[dict[str, Any]]],
    cacheable: bool,
) -> None:
    data = await make_data()
    value_sets = values(data)
    for kwargs in value_sets:
        await assert_same_as_django(make_qs, kwargs)
    info = compiled_sql_cache_info()
    if cacheable:
        # The first call fills the cache; every later one is a hit.
        assert (info.misses, info.hits) == (1, 2 * len(value_sets) - 1)  # ours, then direct
    else:
        assert info.hits == 0


async def test_same_shape_on_another_alias_reads_that_database() -> None:
    default = await make_data()
    other = await make_data("other")
    await Author.objects.using("other").filter(pk=other["bob"].pk).aupdate(name="Bob elsewhere")
    clear_compiled_sql_cache()  # count the reads' entries only
    for _ in range(2):
        await assert_same_as_django(
            lambda: Author.objects.using("other"), {"pk": other["bob"].pk}, "other"
        )
        await assert_same_as_django(Author.objects.all, {"pk": default["bob"].pk})
    assert (await Author.objects.using("other").aget(pk=other["bob"].pk)).name == "Bob elsewhere"
    assert (await Author.objects.aget(pk=default["bob"].pk)).name == "Bob"
    assert compiled_sql_cache_info().size == 2  # one entry per alias


async def test_router_choice_is_made_on_every_call(settings: Any) -> None:
    default = await make_data()
    other = await make_data("other")
    await Author.objects.using("other").filter(pk=other["ann"].pk).aupdate(bio="in other")

    class ToOther:
        def db_for_read(self, model: type[Model], **hints: Any) -> str:
            return "other"

    for _ in range(2):
        ann = await Author.objects.aget(pk=default["ann"].pk)
        assert (ann.bio, ann._state.db) == ("first", "default")
    assert compiled_sql_cache_info().hits == 1
    settings.DATABASE_ROUTERS = [ToOther()]  # a setting change empties the cache
    assert compiled_sql_cache_info().size == 0
    for _ in range(2):
        ann = await Author.objects.aget(pk=other["ann"].pk)
        assert (ann.bio, ann._state.db) == ("in other", "other")
    assert compiled_sql_cache_info().hits == 1


async def test_init_signal_receivers_still_run() -> None:
    from django.db.models.signals import post_init, pre_init

    data = await make_data()
    seen: list[Any] = []

    def on_pre_init(sender: Any, args: Any, kwargs: Any, **rest: Any) -> None:
        seen.append(("pre", sender, tuple(args)))

    def on_post_init(sender: Any, instance: Any, **rest: Any) -> None:
        seen.append(("post", sender, instance.name))

    for _ in range(2):
        await Author.objects.aget(pk=data["ann"].pk)  # cache the shape
    pre_init.connect(on_pre_init, sender=Author)
    post_init.connect(on_post_init, sender=Author)
    try:
        for pk in (data["ann"].pk, data["bob"].pk):
            await assert_same_as_django(Author.objects.all, {"pk": pk})
    finally:
        pre_init.disconnect(on_pre_init, sender=Author)
        post_init.disconnect(on_post_init, sender=Author)
    assert compiled_sql_cache_info().hits == 5
    # Once for Django's path and twice for the cached one (ours, direct), per lookup.
    assert [s[0] for s in seen] == ["pre", "post"] * 6
    assert seen[-1] == ("post", Author, "Bob")


async def test_opt_out_per_alias(db_options: dict[str, Any]) -> None:
    db_options["compiled_sql_cache"] = False
    data = await make_data()
    for pk in (data["ann"].pk, data["bob"].pk, data["ann"].pk):
        await assert_same_as_django(Author.objects.all, {"pk": pk})
    for _ in range(3):
        qs = Author.objects.filter(name="Ann")
        assert qs._deferred_filter is None  # type: ignore[attr-defined]
        assert await qs.aexists()
        assert await Author.objects.filter(name="Ann").acount() == 2
    info = compiled_sql_cache_info()
    assert (info.hits, info.misses, info.size) == (0, 0, 0)
    assert info.bypassed == 6  # ours and direct, per lookup


async def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    data = await make_data()
    monkeypatch.setattr(_fastpath, "MAX_ENTRIES", 2)
    for kwargs in ({"pk": data["ann"].pk}, {"bio": "first"}, {"name": "Bob"}):
        await Author.objects.aget(**kwargs)
        await Author.objects.aget(**kwargs)
    assert compiled_sql_cache_info().size == 2
    await Author.objects.aget(pk=data["bob"].pk)  # evicted: a miss again
    assert compiled_sql_cache_info().misses == 4


async def test_clear_cache() -> None:
    data = await make_data()
    await Author.objects.aget(pk=data["ann"].pk)
    assert compiled_sql_cache_info().size == 1
    clear_compiled_sql_cache()
    assert compiled_sql_cache_info() == _fastpath.CacheInfo(0, 0, 0, 0, _fastpath.MAX_ENTRIES)


async def test_hits_run_in_the_tasks_transaction() -> None:
    from django_async_db import async_atomic, async_connections

    data = await make_data()
    await Author.objects.aget(pk=data["ann"].pk)
    async with async_atomic():
        created = await Author.objects.acreate(name="Cy")
        assert (await Author.objects.aget(pk=created.pk)).name == "Cy"  # a hit
        async_connections["default"].set_rollback(True)
    with pytest.raises(Author.DoesNotExist):
        await Author.objects.aget(pk=created.pk)
    assert compiled_sql_cache_info().hits == 2


@isolate_apps("tests.testapp")
def test_direct_construction_only_for_models_built_like_django_does() -> None:
    from django.db import models

    class Tracked(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

        def __setattr__(self, name: str, value: Any) -> None:
            super().__setattr__(name, value)

    class Custom(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

        @classmethod
        def from_db(cls, db: Any, field_names: Any, values: Any, **kwargs: Any) -> Any:
            return super().from_db(db, field_names, values, **kwargs)

    class Plain(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

        author = models.ForeignKey(Author, on_delete=models.CASCADE)

    assert _fastpath_rows.direct_construction(Plain, ("id", "name", "author_id"))
    assert not _fastpath_rows.direct_construction(Tracked, ("id", "name"))
    assert not _fastpath_rows.direct_construction(Custom, ("id", "name"))
    assert _fastpath_rows.direct_construction(
        Gadget, tuple(f.attname for f in Gadget._meta.concrete_fields)
    )
    assert _fastpath_rows.direct_construction(Author, ("id", "name", "bio"))


# --- filter(**lookups) followed by afirst() / aexists() -----------------------------


def django_filter(make_qs: Callable[[], QuerySet[Any]], kwargs: dict[str, Any]) -> QuerySet[Any]:
    """Django's own ``filter()``, never deferred."""
    return _fastpath._stock_filter(make_qs(), **kwargs)  # type: ignore[no-any-return]


@pytest.mark.parametrize("terminal", ["first", "exists", "count"])
@pytest.mark.parametrize(("make_qs", "values", "cacheable"), SHAPE_PARAMS)
async def test_filter_then_first_or_exists_same_as_django(
    make_qs: Callable[[], QuerySet[Any]],
    values: Callable[[dict[str, Any]], list[dict[str, Any]]],
    cacheable: bool,
    terminal: str,
) -> None:
    data = await make_data()
    value_sets = values(data) * 2  # the shape is learnt, then compiled, then hit
    terminals = 0  # filter() calls that did not raise

    def ours_call(kw: dict[str, Any]) -> Any:
        nonlocal terminals
        filtered = make_qs().filter(**kw)
        terminals += 1
        return getattr(filtered, f"a{terminal}")()

    for kwargs in value_sets:
        django = await outcome(
            "default", lambda kw=kwargs: run_sync(getattr(django_filter(make_qs, kw), terminal))
        )
        ours = await outcome("default", lambda kw=kwargs: ours_call(kw))
        assert ours == django
        assert len(ours[1]) <= 1
    info = compiled_sql_cache_info()
    if cacheable:
        # Every terminal goes through the cache: misses until a value
        # compiles (an out-of-range integer does not), hits after that.
        assert info.misses + info.hits == terminals
        assert info.hits > 0
    else:
        assert info.hits == 0


async def test_a_deferred_filter_is_djangos_filter_for_everything_else() -> None:
    data = await make_data()
    Author.objects.filter(name="Ann")  # learn the shape: the next ones are deferred

    def stock() -> QuerySet[Any]:
        return django_filter(Author.objects.all, {"name": "Ann"})

    def deferred() -> QuerySet[Any]:
        qs = Author.objects.filter(name="Ann")
        assert qs._deferred_filter is not None  # type: ignore[attr-defined]
        return qs

    def sql(qs: QuerySet[Any]) -> Any:
        return qs.query.sql_with_params()

    for build in (
        lambda make: make(),
        lambda make: make().filter(bio="first"),
        lambda make: make().exclude(bio="first"),
        lambda make: make().order_by("-bio")[:1],
        lambda make: make().defer("bio"),
        lambda make: make().values("bio"),
    ):
        assert await run_sync(sql, build(deferred)) == await run_sync(sql, build(stock))
        ours = [snapshot(o) if isinstance(o, Model) else o async for o in build(deferred)]
        theirs = [snapshot(o) if isinstance(o, Model) else o async for o in build(stock)]
        assert ours == theirs
    assert await deferred().acount() == await stock().acount() == 2
    qs = deferred()
    assert await run_sync(repr, qs) == await run_sync(repr, stock())
    assert snapshot(await qs.afirst()) == snapshot(await stock().afirst())  # qs evaluated
    assert await deferred().aget(bio="second") == await stock().aget(bio="second")
    assert await deferred().aupdate(bio="x") == 2
    assert await Author.objects.filter(bio="x").acount() == 2
    # Errors come when Django raises them: at filter() time.
    with pytest.raises(ValueError, match="expected a number"):
        Author.objects.filter(pk="abc")
    with pytest.raises(ValueError, match="expected a number"):
        Author.objects.filter(pk="abc")
    assert data["ann"].pk


async def test_sync_code_in_the_bridge_filters_as_django_does() -> None:
    await make_data()
    Author.objects.filter(name="Ann")  # learn the shape
    assert Author.objects.filter(name="Ann")._deferred_filter is not None  # type: ignore[attr-defined]
    in_bridge = await run_sync(lambda: Author.objects.filter(name="Ann"))
    assert in_bridge._deferred_filter is None  # type: ignore[attr-defined]


async def test_related_managers_filters_are_not_deferred() -> None:
    data = await make_data()
    for _ in range(3):
        books = data["ann"].books.filter(title="A")
        assert books._deferred_filter is None  # type: ignore[attr-defined]
        assert [b.title async for b in books] == ["A"]
        assert await data["ann"].books.filter(title="A").aexists()
