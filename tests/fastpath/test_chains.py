"""Recorded chains (filter/order_by/select_related/slices) against Django's path.

Every shape is built twice per value: in the bridge, where nothing is
recorded (Django's own path), and in async code, where the calls are
recorded and the terminal (``async for``, ``afirst()``, ``aexists()``,
``acount()``, ``aget()``) runs from the compiled SQL cache. Both must send
the same statements (SQL and typed parameters) and give the same objects:
attributes, ``_state`` (``fields_cache`` with the related objects, fetch
mode, peers) and deferred fields, or the same exception and message.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db.models import Count, Model, Q
from django.db.models.query import QuerySet
from django.db.models.sql.compiler import SQLCompiler

from django_async_db import _fastpath as fp
from django_async_db import clear_compiled_sql_cache, compiled_sql_cache_info, run_sync
from django_async_db._fastpath import _Chain, _deferred_kwargs
from tests.fastpath.test_harness import direct_outcome, make_data, statements, typed
from tests.testapp.models import Author, Book, Chapter, ChapterNote, Gadget, Passport, Person

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

UTC = dt.UTC
HAS_FETCH_MODES = hasattr(QuerySet, "fetch_mode")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_compiled_sql_cache()
    yield
    clear_compiled_sql_cache()


async def make_library() -> dict[str, Any]:
    data = await make_data()
    for i in range(12):
        await Book.objects.acreate(
            title=f"{'Abc' if i % 2 else 'xyz'} {i}",
            author=data["ann"] if i % 3 else data["bob"],
            pages=10 * i,
        )
    chapter = await Chapter.objects.acreate(title="loose", book=None)
    await ChapterNote.objects.acreate(chapter=chapter, text="c")
    holder = await Person.objects.acreate(name="has a passport")
    await Person.objects.acreate(name="has none")
    await Passport.objects.acreate(number="P1", holder=holder, issuer=holder)
    await Passport.objects.acreate(number="P2", holder=None)
    clear_compiled_sql_cache()  # the writes above filled its write side: count reads only
    return data


def snap(obj: Any, depth: int = 0) -> Any:
    """Return everything observable about an instance, related objects included."""
    if not isinstance(obj, Model):
        return (type(obj), obj)
    state = dict(obj._state.__dict__)
    peers = state.pop("peers", None)
    cache = state.pop("fields_cache", None)
    return (
        type(obj),
        list(obj.__dict__),
        {k: attribute(v) for k, v in obj.__dict__.items() if k != "_state"},
        state,
        None
        if cache is None
        else {k: snap(v, depth + 1) if depth < 3 else repr(v) for k, v in cache.items()},
        None if peers is None else (len(peers), [p() is obj for p in peers].index(True)),
        obj.get_deferred_fields(),
    )


def attribute(value: Any) -> Any:
    if isinstance(value, dict):  # _prefetched_objects_cache: name -> evaluated queryset
        return {k: [snap(o) for o in v._result_cache] for k, v in value.items()}
    return (type(value), value)


def snap_result(result: Any) -> Any:
    if isinstance(result, BaseException):
        return ("raised", type(result), str(result))
    if isinstance(result, list):
        # The peers lists: one per model per query, shared by its objects.
        shared = [id(o._state.__dict__.get("peers")) for o in result]
        return [snap(o) for o in result], [shared.index(i) for i in shared]
    return snap(result)


async def outcome(call: Callable[[], Any]) -> tuple[Any, list[Any]]:
    with statements("default") as seen:
        try:
            result = snap_result(await call())
        except Exception as exc:
            result = snap_result(exc)
    return result, seen


TERMINALS: dict[str, tuple[Callable[[QuerySet[Any]], Any], Callable[[QuerySet[Any]], Any]]] = {
    # terminal: (Django's sync call, run in the bridge; ours, awaited in async code)
    "iter": (list, lambda qs: _alist(qs)),
    "first": (lambda qs: qs.first(), lambda qs: qs.afirst()),
    "exists": (lambda qs: qs.exists(), lambda qs: qs.aexists()),
    "count": (lambda qs: qs.count(), lambda qs: qs.acount()),
    "get": (lambda qs: qs.get(), lambda qs: qs.aget()),
}


async def _alist(qs: QuerySet[Any]) -> list[Any]:
    return [obj async for obj in qs]


async def assert_chain_same_as_django(
    build: Callable[[Any], QuerySet[Any]], values: list[Any], terminal: str
) -> None:
    """Assert ``build(value)`` + ``terminal`` agrees with Django's for every value."""
    django_call, ours_call = TERMINALS[terminal]
    for value in values:
        django = await outcome(lambda v=value: run_sync(lambda: django_call(build(v))))
        ours = await outcome(lambda v=value: ours_call(build(v)))
        assert ours == django, value
        direct = await direct_outcome(lambda v=value: ours_call(build(v)), snap_result)
        assert direct == django[0], value


# (id, build(value) -> queryset, values, cacheable)
CHAINS: list[tuple[str, Callable[[Any], QuerySet[Any]], list[Any], bool]] = [
    ("gt", lambda v: Book.objects.filter(pages__gt=v).order_by("pk"), [20, 50, 10**6], True),
    ("gte", lambda v: Book.objects.filter(pages__gte=v).order_by("-pk"), [20, 100], True),
    ("lt", lambda v: Book.objects.filter(pages__lt=v).order_by("pages"), [30, 0], True),
    ("lte", lambda v: Book.objects.filter(pages__lte=v).order_by("-pages", "pk"), [30], True),
    ("pk__gte", lambda v: Book.objects.filter(pk__gte=v).order_by("id")[:3], [1, 5], True),
    ("iexact", lambda v: Book.objects.filter(title__iexact=v), ["a", "ABC 1", "no"], True),
    (
        "contains",
        lambda v: Book.objects.filter(title__contains=v).order_by("pk"),
        ["bc", "%"],
        True,
    ),
    (
        "icontains",
        lambda v: Book.objects.filter(title__icontains=v).order_by("pk"),
        ["BC", "_"],
        True,
    ),
    (
        "startswith",
        lambda v: Book.objects.filter(title__startswith=v).order_by("pk"),
        ["x", "A"],
        True,
    ),
    (
        "istartswith",
        lambda v: Book.objects.filter(title__istartswith=v).order_by("pk"),
        ["X"],
        True,
    ),
    (
        "endswith",
        lambda v: Book.objects.filter(title__endswith=v).order_by("pk"),
        ["1", "\\"],
        True,
    ),
    ("iendswith", lambda v: Book.objects.filter(title__iendswith=v).order_by("pk"), ["Z 0"], True),
    ("pages as str", lambda v: Book.objects.filter(pages__gte=v).order_by("pk"), ["30", "x"], True),
    ("out of range", lambda v: Book.objects.filter(pages__gt=v).order_by("pk"), [1, 2**70], True),
    ("fk name", lambda v: Book.objects.filter(author=v).order_by("title"), [0, 10**9], True),
    ("fk attname gte", lambda v: Book.objects.filter(author_id__gte=v).order_by("pk"), [1], True),
    ("slice [a:b]", lambda v: Book.objects.filter(pages__gte=v).order_by("pk")[2:5], [0, 50], True),
    ("slice [a:]", lambda v: Book.objects.filter(pages__gte=v).order_by("pk")[3:], [0], True),
    ("empty slice", lambda v: Book.objects.filter(pages__gte=v).order_by("pk")[2:2], [0], False),
    ("slice first", lambda v: Book.objects.order_by("pk")[:4].select_related("author"), [0], True),
    (
        "two filters",
        lambda v: Book.objects.filter(pages__gte=v).filter(title__startswith="A").order_by("pk"),
        [0, 50],
        True,
    ),
    (
        "filters around order_by",
        lambda v: Book.objects.filter(pages__lt=v).order_by("-pk").filter(pages__gt=10),
        [100, 60],
        True,
    ),
    (
        "W2",
        lambda v: Book.objects.filter(id__gte=v).order_by("id")[:20],
        [1, 3, 10**6],
        True,
    ),
    (
        "W3",
        lambda v: Book.objects.select_related("author").filter(id__gte=v).order_by("id")[:20],
        [1, 4],
        True,
    ),
    (
        "select_related nested",
        lambda v: (
            Chapter.objects.select_related("book__author").filter(title__gte=v).order_by("pk")
        ),
        ["a", ""],
        True,
    ),
    (
        "select_related nullable",
        lambda v: Gadget.objects.select_related("owner").filter(price__gte=v).order_by("pk"),
        [0, 1],
        True,
    ),
    (
        "select_related nullable one-to-one",
        lambda v: ChapterNote.objects.filter(text__gte=v).select_related(
            "previous", "chapter__book"
        ),
        ["a", "b"],
        True,
    ),
    (
        "select_related one-to-one",
        lambda v: Passport.objects.filter(number__gte=v).select_related("holder").order_by("pk"),
        ["P", "P2"],
        True,
    ),
    (
        "select_related reverse one-to-one",
        lambda v: Person.objects.filter(name__gte=v).select_related("passport").order_by("pk"),
        ["a", "has n"],
        True,
    ),
    (
        "select_related one-to-one, custom __init__",
        lambda v: ChapterNote.objects.filter(text__gte=v).select_related("follower").order_by("pk"),
        ["a", "b"],
        True,
    ),
    (
        "select_related two",
        lambda v: (
            Passport.objects.filter(number__gte=v).select_related("issuer", "holder").order_by("pk")
        ),
        ["P"],
        True,
    ),
    (
        "using()",
        lambda v: Book.objects.using("default").filter(pages__gte=v).order_by("pk")[:2],
        [0],
        True,
    ),
    ("no filter", lambda v: Book.objects.order_by("-title")[:v], [2, 3], True),
    # Django's path, unchanged.
    ("using() after", lambda v: Book.objects.filter(pages__gte=v).using("default"), [0], False),
    ("prefetch", lambda v: Author.objects.filter(pk__gte=v).prefetch_related("books"), [0], False),
    ("only", lambda v: Book.objects.filter(pages__gte=v).only("title").order_by("pk"), [0], False),
    (
        "defer",
        lambda v: Book.objects.filter(pages__gte=v).defer("title").order_by("pk"),
        [0],
        False,
    ),
    ("values", lambda v: Book.objects.filter(pages__gte=v).values("title"), [0], False),
    ("exclude", lambda v: Book.objects.filter(pages__gte=v).exclude(pages=20), [0], False),
    ("Q object", lambda v: Book.objects.filter(Q(pages__gte=v)).order_by("pk"), [0], False),
    ("annotate", lambda v: Book.objects.filter(pages__gte=v).annotate(n=Count("tags")), [0], False),
    ("distinct", lambda v: Book.objects.filter(pages__gte=v).distinct().order_by("pk"), [0], False),
    ("extra", lambda v: Book.objects.filter(pages__gte=v).extra(where=["1=1"]), [0], False),
    (
        "related path",
        lambda v: Book.objects.filter(author__name__gte=v).order_by("pk"),
        ["A"],
        False,
    ),
    ("transform", lambda v: Book.objects.filter(pages__in=[v]).order_by("pk"), [20], False),
    (
        "related ordering",
        lambda v: Book.objects.filter(pages__gte=v).order_by("author__name"),
        [0],
        False,
    ),
]


class CustomQuerySet(QuerySet[Any]):
    def filter(self, *args: Any, **kwargs: Any) -> Any:
        return super().filter(*args, **kwargs)


CHAINS.append(
    (
        "custom queryset",
        lambda v: CustomQuerySet(Book).filter(pages__gte=v).order_by("pk"),
        [0],
        False,
    )
)
if HAS_FETCH_MODES:
    from django.db.models import FETCH_PEERS

    CHAINS.append(
        (
            "FETCH_PEERS",
            lambda v: (
                Book.objects.fetch_mode(FETCH_PEERS)
                .select_related("author")
                .filter(pages__gte=v)
                .order_by("pk")
            ),
            [0, 50],
            True,
        )
    )

CHAIN_PARAMS = [pytest.param(b, v, c, id=name) for name, b, v, c in CHAINS]


@pytest.mark.parametrize("terminal", list(TERMINALS))
@pytest.mark.parametrize(("build", "values", "cacheable"), CHAIN_PARAMS)
async def test_chain_same_sql_params_and_objects_as_django(
    build: Callable[[Any], QuerySet[Any]], values: list[Any], cacheable: bool, terminal: str
) -> None:
    data = await make_library()
    assert data["ann"].pk
    await assert_chain_same_as_django(build, values * 2, terminal)  # miss, then hits
    info = compiled_sql_cache_info()
    chain = build(values[0])._deferred_filter  # type: ignore[attr-defined]
    sliced = type(chain) is _Chain and any(op.kind == "slice" for op in chain)
    if not cacheable or (terminal == "count" and sliced):  # count() of a slice: a subquery
        assert info.hits == 0
    else:
        assert info.hits > 0


@pytest.mark.parametrize(
    ("build", "fused"),
    [
        pytest.param(lambda: Passport.objects.select_related("holder"), True, id="one-to-one"),
        pytest.param(
            lambda: Person.objects.select_related("passport"), True, id="reverse one-to-one"
        ),
        pytest.param(lambda: Book.objects.select_related("author"), True, id="foreign key"),
        pytest.param(lambda: Passport.objects.select_related("issuer", "holder"), True, id="two"),
        pytest.param(lambda: Chapter.objects.select_related("book__author"), False, id="nested"),
        pytest.param(
            lambda: ChapterNote.objects.select_related("previous"), False, id="custom __init__"
        ),
        pytest.param(lambda: Book.objects.all(), False, id="none"),
    ],
)
async def test_one_level_select_related_rows_are_built_by_one_fused_maker(
    build: Callable[[], QuerySet[Any]], fused: bool
) -> None:
    await make_library()
    qs = build().filter(pk__gte=0).order_by("pk")
    django = await run_sync(lambda: list(build().filter(pk__gte=0).order_by("pk")))
    ours = [o async for o in qs]
    assert [snap(o) for o in ours] == [snap(o) for o in django]
    [entry] = [e for e in fp._cache.values() if e is not None and e.plan is not None]
    assert (entry.plan.fused is not None) is fused


async def test_a_hit_compiles_nothing_and_runs_on_the_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_library()
    compiled = 0
    as_sql = SQLCompiler.as_sql

    def counting(self: SQLCompiler, *args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        compiled += 1
        return as_sql(self, *args, **kwargs)

    monkeypatch.setattr(SQLCompiler, "as_sql", counting)

    def w3(start: int) -> QuerySet[Any]:
        return Book.objects.select_related("author").filter(id__gte=start).order_by("id")[:20]

    pks = [pk async for pk in Book.objects.order_by("pk").values_list("pk", flat=True)]
    assert len([b async for b in w3(pks[0])]) == 14  # the miss: compiled (twice)
    assert compiled > 0
    compiled = 0
    threads = set()
    with statements("default") as seen:
        names = [b.author.name async for b in w3(pks[1])]
        threads.add(threading.get_ident())
    assert compiled == 0
    assert len(names) == 13
    assert len(seen) == 1
    assert threads == {threading.get_ident()}
    assert compiled_sql_cache_info().hits == 1


async def test_recorded_calls_run_on_the_loop_thread() -> None:
    from django.db import connections

    await make_library()
    idents: list[int] = []

    def record(execute: Callable[..., Any], *args: Any) -> Any:
        idents.append(threading.get_ident())
        return execute(*args)

    with connections["default"].execute_wrapper(record):
        for start in (1, 2):
            assert [b async for b in Book.objects.filter(id__gte=start).order_by("id")[:2]]
    assert idents == [threading.get_ident()] * 2


async def test_reading_query_applies_the_calls_as_django_does() -> None:
    await make_library()

    def ours() -> QuerySet[Any]:
        qs = Book.objects.select_related("author").filter(pages__gte=10).order_by("-pk")
        qs = qs.filter(title__startswith="A")[1:4]
        assert type(qs._deferred_filter) is _Chain  # type: ignore[attr-defined]
        return qs

    def django() -> QuerySet[Any]:
        qs = Book.objects.select_related("author").filter(pages__gte=10).order_by("-pk")
        return qs.filter(title__startswith="A")[1:4]

    recorded = ours()
    theirs = await run_sync(django)
    assert recorded.query.sql_with_params() == theirs.query.sql_with_params()
    assert recorded._deferred_filter is None  # type: ignore[attr-defined]
    assert recorded.query.select_related == theirs.query.select_related
    assert (recorded.query.low_mark, recorded.query.high_mark) == (1, 4)
    # Errors come when Django raises them.
    with pytest.raises(TypeError, match="Cannot filter a query once a slice"):
        ours().filter(pages=1)
    with pytest.raises(TypeError, match="Cannot reorder a query once a slice"):
        ours().order_by("pk")
    with pytest.raises(Exception, match="Cannot resolve keyword"):
        Book.objects.filter(pages__gte=1).order_by("nope")
    with pytest.raises(ValueError, match="expected a number"):
        Book.objects.filter(pages__gte=1).filter(pages__lt="abc")
    with pytest.raises(Exception, match="Invalid field name"):
        [b async for b in Book.objects.select_related("nope").filter(pages__gte=1)]


async def test_async_for_evaluates_the_queryset() -> None:
    await make_library()
    for _ in range(2):
        qs = Book.objects.filter(pages__gte=50).order_by("pk")
        first = [b async for b in qs]
        assert qs._result_cache is not None  # type: ignore[attr-defined]
        again = [b async for b in qs]  # from the result cache: no query
        assert [b.pk for b in again] == [b.pk for b in first]
        assert [b.pk for b in qs[:2]] == [b.pk for b in first[:2]]
        assert await qs.acount() == len(first)
    assert compiled_sql_cache_info().hits == 1


async def test_deferred_kwargs_only_for_a_single_filter() -> None:
    await make_library()
    assert _deferred_kwargs(Book.objects.filter(pages=1)) == {"pages": 1}
    assert _deferred_kwargs(Book.objects.filter(pages=1).filter(title="A")) is None
    assert _deferred_kwargs(Book.objects.filter(pages=1).order_by("pk")) is None
    assert _deferred_kwargs(Book.objects.order_by("pk")) is None
    assert _deferred_kwargs(Book.objects.all()) is None
    assert _deferred_kwargs(await run_sync(lambda: Book.objects.filter(pages=1))) is None


async def test_nothing_is_recorded_in_sync_code_or_when_opted_out(
    db_options: dict[str, Any],
) -> None:
    assert type(Book.objects.order_by("pk")._deferred_filter) is _Chain  # type: ignore[attr-defined]
    in_bridge = await run_sync(lambda: Book.objects.filter(pages=1).order_by("pk")[:2])
    assert in_bridge._deferred_filter is None  # type: ignore[attr-defined]
    db_options["compiled_sql_cache"] = False
    assert Book.objects.order_by("pk")[:2]._deferred_filter is None  # type: ignore[attr-defined]


def test_typed_helper_is_shared() -> None:
    assert typed(1) == (int, 1)


async def test_an_evaluated_queryset_is_not_recorded_on() -> None:
    """Calls on an evaluated queryset behave as Django's: nothing of its results leaks."""
    await make_library()
    qs = Author.objects.all()
    everyone = [a async for a in qs]
    assert len({a.name for a in everyone}) > 1
    anns = [a async for a in qs.filter(name="Ann")]
    assert anns
    assert {a.name for a in anns} == {"Ann"}
    ordered = [a async for a in qs.order_by("-name")]
    assert [a.name for a in ordered] == sorted((a.name for a in everyone), reverse=True)
    # Django slices an evaluated queryset's results: a list, no query.
    with statements("default") as seen:
        first_two = qs[:2]
    assert isinstance(first_two, list)
    assert first_two == everyone[:2]
    assert seen == []
