"""Reuse compiled SQL for repeated query shapes (the compiled SQL cache).

``Book.objects.aget(pk=1)`` and ``Book.objects.aget(pk=2)`` differ only in a
parameter value, yet Django clones the queryset, resolves the lookup, joins
and compiles the SQL again on every call. On this ENGINE, repeated query
shapes take a shorter road from their second call on:

1. In async code, ``filter(**lookups)``, ``order_by(*names)``,
   ``select_related(*names)`` and slicing on a *pristine* queryset (the one
   a stock manager hands out) are recorded instead of applied
   (:mod:`django_async_db._fastpath_chain`); reading ``.query`` (any other
   method, sync iteration ...) applies them with Django's own methods, in
   call order.
2. ``aget()``, ``afirst()``, ``aexists()``, ``acount()`` and ``async for`` on
   a pristine or recorded queryset look their shape up without compiling:
   the operation, queryset class, model, the alias the router chooses for
   this call, the fetch mode, each recorded step (lookup names and value
   types, ordering names, ``select_related`` names, slice bounds).
3. On the first call of a shape (a miss), Django's path runs as usual; the
   queryset Django built is also compiled once more, the way the terminal
   method compiles it, and the entry keeps the SQL text, the lookup objects
   of the WHERE clause (each checked to be the lookup of the keyword it is
   mapped to), the column converters and the row-to-instance plan. The entry
   is only kept if the parameters rebuilt from the lookups equal Django's own
   for that call; otherwise the shape is marked as "use Django's path".
4. On a hit, the parameters are rebuilt with Django's own lookup classes
   (``GreaterThanOrEqual(col, value).process_rhs()``: ``get_prep_value``,
   ``get_db_prep_value``, ``LIKE`` escaping, so conversions and validation
   errors are Django's). Where Django's cursor layer would add nothing (see
   :func:`_direct_ok`), the cached SQL runs on the task's connection in plain
   async code (:func:`_hit`); otherwise it runs in a bridge through Django's
   cursor wrapper (execute wrappers, query logging, ``assertNumQueries`` and
   transaction checks apply). Rows become instances as ``ModelIterable`` and
   ``RelatedPopulator`` build them (:mod:`django_async_db._fastpath_rows`).

Anything else (positional ``Q`` arguments, ``None`` or expression values,
other lookups, related-field paths, other queryset methods, custom queryset
or query classes that change the methods involved) takes Django's path
unchanged. ``DATABASES[alias]["OPTIONS"]["compiled_sql_cache"] = False``
turns the cache off for an alias.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

from django.core.exceptions import (
    EmptyResultSet,
    FieldDoesNotExist,
    FullResultSet,
    SynchronousOnlyOperation,
)
from django.core.signals import setting_changed
from django.db import connections
from django.db.backends.postgresql import base as pg_base
from django.db.models import Count, Model, signals
from django.db.models.expressions import Col
from django.db.models.query import MAX_GET_RESULTS, ModelIterable, QuerySet
from django.db.models.sql import Query
from django.db.models.sql.where import AND
from psycopg.adapt import PyFormat

from ._bridge import run_sync
from ._fastpath_rows import Plan, build_plan, rows_to_objects
from .backends.postgresql._psycopg import BridgeConnection

__all__ = ["CacheInfo", "clear_compiled_sql_cache", "compiled_sql_cache_info", "install"]

ENGINE = "django_async_db.backends.postgresql"

#: How many query shapes the cache holds (least recently used ones go first).
MAX_ENTRIES = 1024

#: Value types whose preparation cannot change the SQL text (None, model
#: instances, expressions and querysets can: they take Django's path).
_PLAIN_TYPES = frozenset({int, str, float, Decimal, UUID, date, datetime, time, bytes})

#: Lookups whose right-hand side compiles to a single ``%s`` for a plain value.
_VALUE_LOOKUPS = frozenset(
    {
        "exact",
        "gt",
        "gte",
        "lt",
        "lte",
        "iexact",
        "contains",
        "icontains",
        "startswith",
        "istartswith",
        "endswith",
        "iendswith",
    }
)

#: ``QuerySet`` attributes the cached operations rely on: a subclass
#: overriding one of them takes Django's path.
_GET_METHODS = (
    "get",
    "first",
    "exists",
    "count",
    "filter",
    "_filter_or_exclude",
    "_filter_or_exclude_inplace",
    "order_by",
    "select_related",
    "__getitem__",
    "__aiter__",
    "__iter__",
    "ordered",
    "_chain",
    "_clone",
    "__len__",
    "_fetch_all",
    "db",
    "query",
    "__init__",
)


class CacheInfo(NamedTuple):
    """Counters of the compiled SQL cache (see :func:`compiled_sql_cache_info`)."""

    hits: int
    misses: int
    bypassed: int
    size: int
    max_size: int


class _Entry:
    """A compiled shape: SQL, lookups to rebuild parameters, row conversion."""

    __slots__ = ("converters", "lookups", "model", "order", "plan", "prefix", "pure", "sql")

    def __init__(
        self,
        model: type[Model],
        sql: str,
        prefix: tuple[Any, ...],
        lookups: list[tuple[Callable[..., Any], Any] | None],
        order: tuple[int, ...],
        plan: Plan | None,
        converters: list[tuple[int, tuple[list[Any], Any]]],
    ) -> None:
        self.model = model
        self.sql = sql
        self.prefix = prefix
        self.lookups = lookups  # per WHERE child: (lookup class, lhs), None: no parameter
        self.order = order  # per WHERE child: the position of its value
        self.plan = plan  # how rows become instances (None: no instances)
        self.converters = converters
        # Rows become the result without user code (no converter, no from_db()
        # or __init__ of the models): the result can be made outside a bridge.
        self.pure = not converters and (plan is None or plan.all_direct())


class _Op(NamedTuple):
    """One recorded queryset method call (see :mod:`django_async_db._fastpath_chain`)."""

    kind: str  # "filter", "order_by", "select_related" or "slice"
    sig: Hashable  # its part of the shape key
    args: Any  # filter: the kwargs; order_by/select_related: names; slice: (start, stop)
    # filter: per keyword, in order, the lookup Django built for its value when
    # filter() checked it (reused on a hit: what Django would compile); else ().
    built: tuple[Any, ...]


class _Chain(tuple[_Op, ...]):
    """The recorded calls of a queryset, kept in its ``_deferred_filter`` slot.

    Django's ``QuerySet.query`` applies ``_deferred_filter`` when it is
    truthy; the cache's ``query`` applies a ``_Chain`` with Django's methods.
    """

    __slots__ = ()


_cache: OrderedDict[Hashable, _Entry | None] = OrderedDict()
_lock = threading.Lock()
_hits = _misses = _bypassed = 0
# Hits whose query ran in plain async code (see _hit): for tests.
_direct_hits = 0
# QuerySet subclass -> its methods involved are Django's
_stock_classes: dict[type, bool] = {QuerySet: True}
# model -> Query.__dict__ of a fresh query and of a chained (cloned) one
_pristine: dict[type[Model], tuple[dict[str, Any], dict[str, Any]]] = {}
# Shapes of recorded calls Django accepted (see _fastpath_chain): cleared with the cache.
_learnt: dict[Hashable, Any] = {}


# Other compiled SQL caches (the write shapes of ``_fastwrite``): their counters
# (hits, misses, bypassed, size) are added to this one's, and they are emptied
# with it.
_companions: list[tuple[Callable[[], tuple[int, int, int, int]], Callable[[], None]]] = []


def register_companion(
    info: Callable[[], tuple[int, int, int, int]], clear: Callable[[], None]
) -> None:
    """Count another cache's entries in :func:`compiled_sql_cache_info`; clear it with this one."""
    _companions.append((info, clear))


def compiled_sql_cache_info() -> CacheInfo:
    """Return the compiled SQL cache's hit, miss and bypass counts and its size.

    ``bypassed`` counts calls that took Django's path because their shape is
    not cacheable. Reads and writes (``acreate()``, ``asave()``, ``aupdate()``)
    are counted together; ``max_size`` bounds each. Example::

        from django_async_db import compiled_sql_cache_info

        info = compiled_sql_cache_info()
        hit_rate = info.hits / max(info.hits + info.misses, 1)
    """
    counts = [_hits, _misses, _bypassed, len(_cache)]
    for info, _ in _companions:
        counts = [a + b for a, b in zip(counts, info(), strict=True)]
    return CacheInfo(counts[0], counts[1], counts[2], counts[3], MAX_ENTRIES)


def clear_compiled_sql_cache() -> None:
    """Forget every compiled query shape and reset the counters.

    Done automatically when a setting changes (``override_settings``) or the
    app registry is reloaded; call it after changing models or fields at run
    time by other means. Example::

        from django_async_db import clear_compiled_sql_cache, compiled_sql_cache_info

        clear_compiled_sql_cache()
        assert compiled_sql_cache_info().size == 0
    """
    global _hits, _misses, _bypassed
    with _lock:
        _cache.clear()
        _stock_classes.clear()
        _stock_classes[QuerySet] = True
        _pristine.clear()
        _learnt.clear()
        _hits = _misses = _bypassed = 0
    for _, clear in _companions:
        clear()


def _on_setting_changed(**kwargs: Any) -> None:
    clear_compiled_sql_cache()


def _alias_allowed(alias: str) -> bool:
    """Return True if ``alias`` uses this ENGINE and has not opted out of the cache."""
    # Read every time (a dict lookup or two): tests edit settings dicts in place.
    settings = connections.settings.get(alias)
    return (
        settings is not None
        and settings["ENGINE"] == ENGINE
        and settings["OPTIONS"].get("compiled_sql_cache", True) is not False
    )


def _is_stock_class(cls: type) -> bool:
    stock = _stock_classes.get(cls)
    if stock is None:
        stock = all(getattr(cls, name) is getattr(QuerySet, name) for name in _GET_METHODS)
        _stock_classes[cls] = stock
    return stock


def _is_pristine(qs: QuerySet[Any], deferred: Any = None) -> bool:
    """Return True if ``qs`` is what a stock manager's ``get_queryset()`` returns.

    With ``deferred``: a recorded queryset (its ``_Chain``), the calls still pending.
    """
    if (
        qs._deferred_filter is not deferred  # type: ignore[attr-defined]
        or qs._iterable_class is not ModelIterable
        or qs._fields is not None  # type: ignore[attr-defined]
        or qs._prefetch_related_lookups  # type: ignore[attr-defined]
        or qs._known_related_objects  # type: ignore[attr-defined]
        or qs._sticky_filter  # type: ignore[attr-defined]
        or qs._defer_next_filter  # type: ignore[attr-defined]
        or not _is_stock_class(type(qs))
    ):
        return False
    query = qs._query  # type: ignore[attr-defined]
    if type(query) is not Query:
        return False
    model = qs.model
    templates = _pristine.get(model)
    if templates is None:
        fresh = Query(model)
        templates = _pristine[model] = (fresh.__dict__, fresh.chain().__dict__)
    # Every attribute a queryset method sets lands in the instance dict: equal
    # dicts (WhereNode compares its children) mean an untouched query, fresh
    # from get_queryset() or cloned by using(), all(), fetch_mode() ...
    state = query.__dict__
    return state == templates[0] or state == templates[1]  # type: ignore[no-any-return]


def _value_sig(kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """Return the key part of keyword lookups: names and value types (None: not cacheable)."""
    parts: list[Any] = []
    for name, value in kwargs.items():
        kind = type(value)
        if kind is bool:
            parts.append((name, value))  # "col" / NOT "col": the value is in the SQL
        elif kind in _PLAIN_TYPES:
            parts.append((name, kind))
        else:
            return None
    return tuple(parts)


def _lookup_target(model: type[Model], name: str) -> tuple[Any, str] | None:
    """Return (field, lookup name) of a keyword lookup on a field of ``model`` itself."""
    field_name, _, lookup = name.partition("__")
    if not lookup:
        lookup = "exact"
    elif lookup not in _VALUE_LOOKUPS:
        return None  # a path through relations, a transform or another lookup
    opts = model._meta
    try:
        field = opts.pk if field_name == "pk" else opts.get_field(field_name)
    except FieldDoesNotExist:
        return None
    if not getattr(field, "concrete", False) or field.many_to_many:
        return None
    return field, lookup


def _where_lookups(
    query: Query, model: type[Model], groups: list[dict[str, Any]]
) -> tuple[list[Any], tuple[int, ...]] | None:
    """Map the WHERE clause's children to the keyword lookups of ``groups``, in order.

    ``groups`` are the kwargs of each ``filter()`` call, in call order. Django
    ANDs each call's ``Q(**kwargs)`` (which sorts its keywords) into the WHERE
    clause; child i must be the lookup of the keyword mapped to it: the same
    lookup name on a column of the model's own table for the same field.
    Returns the children and, per child, the position of its value in the
    flattened values; None if the clause is anything else.
    """
    expected: list[tuple[int, Any, str]] = []
    offset = 0
    for kwargs in groups:
        names = list(kwargs)
        for name in sorted(names):
            target = _lookup_target(model, name)
            if target is None:
                return None
            expected.append((offset + names.index(name), *target))
        offset += len(names)
    where = query.where
    if where.connector != AND or where.negated or len(where.children) != len(expected):
        return None
    table = model._meta.db_table
    children: list[Any] = list(where.children)
    for child, (_, field, lookup) in zip(children, expected, strict=True):
        lhs = getattr(child, "lhs", None)
        if (
            getattr(child, "lookup_name", None) != lookup
            or type(lhs) is not Col
            or lhs.target is not field
            or lhs.alias != table
        ):
            return None
    return children, tuple(position for position, _, _ in expected)


def _compile(
    query: Query,
    model: type[Model],
    alias: str,
    kwargs: dict[str, Any],
    *,
    instances: bool,
    groups: list[dict[str, Any]] | None = None,
) -> _Entry | None:
    """Build the entry for a compiled query whose WHERE clause is keyword lookups.

    ``groups``: the kwargs of each filter() call in order (default: ``[kwargs]``).
    """
    if groups is None:
        groups = [kwargs]
    values = [value for group in groups for value in group.values()]
    connection = connections[alias]
    compiler = query.get_compiler(using=alias)
    sql, params = compiler.as_sql()
    mapped = _where_lookups(query, model, groups)
    if mapped is None:
        return None
    children, order = mapped
    lookups: list[tuple[Callable[..., Any], Any] | None] = []
    rebuilt: list[Any] = []
    for child, position in zip(children, order, strict=True):
        value = values[position]
        _, child_params = compiler.compile(child)
        if not child_params and type(value) is bool:
            # "col" / "NOT col": the value (part of the key) is in the SQL text.
            lookups.append(None)
            continue
        lookup = type(child)(child.lhs, value)
        rhs_sql, rhs_params = lookup.process_rhs(compiler, connection)
        if rhs_sql != "%s" or len(rhs_params) != 1 or not _same_params(rhs_params, child_params):
            return None
        rebuilt.extend(rhs_params)
        lookups.append((type(child), child.lhs))
    # The WHERE clause's parameters come last (LIMIT is inlined, plain
    # orderings and select_related joins have none); anything before them
    # belongs to the SELECT list (exists()'s "1 AS a"): constants.
    _, where_params = compiler.compile(query.where) if children else ("", [])
    split = len(params) - len(where_params)
    if (
        split < 0
        or not _same_params(rebuilt, where_params)
        or not _same_params(params[split:], where_params)
    ):
        return None
    prefix = tuple(params[:split])
    if not instances:
        return _Entry(model, sql, prefix, lookups, order, None, [])
    klass_info = compiler.klass_info
    if (
        not klass_info
        or compiler.annotation_col_map
        or compiler.has_extra_select
        or len(compiler.select) != compiler.col_count
        or klass_info["model"] is not model
    ):
        return None
    fields = [s[0] for s in compiler.select]
    if compiler.has_composite_fields(fields):
        return None
    plan = build_plan(klass_info, compiler.select)
    if plan is None or plan.start != 0:
        return None
    converters = list(compiler.get_converters(fields).items())
    return _Entry(model, sql, prefix, lookups, order, plan, converters)


def _compile_count(base: QuerySet[Any], alias: str, groups: list[dict[str, Any]]) -> _Entry | None:
    """Compile ``base.count()`` the way Django does (``Query.get_count()``).

    ``Query.get_aggregation()`` for a query without annotations, grouping,
    slicing, distinct or combinator takes its no-subquery branch; these are
    its steps, up to ``as_sql()``. Anything else (a sliced queryset counts
    through a subquery) is not cached.
    """
    query = base.query.clone()
    if (
        query.annotations
        or query.group_by is not None
        or query.is_sliced
        or query.distinct
        or query.combinator
        or query.extra
    ):
        return None
    aggregate = Count("*").resolve_expression(query, allow_joins=True, reuse=None, summarize=True)
    query.select = ()
    query.selected = None
    query.default_cols = False
    query.extra = {}
    query.annotations = {"__count": aggregate}
    query.set_annotation_mask({"__count": aggregate})
    query.clear_ordering(force=True)
    query.clear_limits()
    query.select_for_update = False
    query.select_related = False
    # Count's empty_result_set_value is 0, not NotImplemented: Django
    # compiles with elide_empty=True, get_compiler()'s default.
    entry = _compile(query, base.model, alias, {}, instances=False, groups=groups)
    if entry is not None:
        compiler = query.get_compiler(using=alias)
        cols = list(query.annotation_select.values())
        if compiler.has_composite_fields(cols):
            return None
        entry.converters = list(compiler.get_converters(cols).items())
        entry.pure = not entry.converters
    return entry


def _compile_operation(
    base: QuerySet[Any], operation: str, alias: str, chain: _Chain, kwargs: dict[str, Any]
) -> _Entry | None:
    """Compile ``operation`` on ``base`` (Django's queryset for the chain) as Django does."""
    groups = [op.args for op in chain if op.kind == "filter"]
    model = base.model
    if operation == "count":
        return _compile_count(base, alias, groups)
    if operation == "exists":
        query = base.query.exists()  # Query.has_results()
        return _compile(query, model, alias, {}, instances=False, groups=groups)
    if operation == "get":  # QuerySet.get(**kwargs), select_for_update aside
        clone = _stock_filter(base, **kwargs)
        if base.query.can_filter() and not base.query.distinct_fields:
            clone = _stock_order_by(clone)
        clone.query.set_limits(high=MAX_GET_RESULTS)
        query = clone.query
        groups.append(kwargs)
    elif operation == "first":  # QuerySet.first()
        if base.ordered or not base.query.default_ordering:
            queryset = base
        else:
            queryset = _stock_order_by(base, "pk")
        query = _stock_getitem(queryset, slice(None, 1)).query
    else:  # "iter": _fetch_all()
        query = base.query
    return _compile(query, model, alias, {}, instances=True, groups=groups)


def _comparable(param: Any) -> tuple[type, Any]:
    """Return what identifies a parameter (psycopg's Binary/Jsonb wrappers have no ``==``)."""
    cls = type(param)
    if cls.__eq__ is not object.__eq__:  # type: ignore[comparison-overlap]
        return (cls, param)
    slots = [name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())]
    return (
        cls,
        [vars(param) if hasattr(param, "__dict__") else None]
        + [getattr(param, name, None) for name in slots],
    )


def _same_params(ours: Any, django: Any) -> bool:
    """Return True if two parameter lists are equal, value by value and type by type."""
    return len(ours) == len(django) and all(
        _comparable(a) == _comparable(b) for a, b in zip(ours, django, strict=True)
    )


def _store(key: Hashable, entry: _Entry | None) -> None:
    with _lock:
        _cache[key] = entry
        if len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)


def _rows_to_objects(entry: _Entry, rows: list[Any], alias: str, fetch_mode: Any) -> list[Any]:
    """Turn result rows into instances exactly as ``ModelIterable`` does."""
    assert entry.plan is not None
    return rows_to_objects(entry.plan, entry.converters, rows, alias, fetch_mode)


class _UseDjango(Exception):
    """Raised by a hit whose values change the SQL: this call takes Django's path."""


def _lookup_params(
    lookups: list[tuple[Callable[..., Any], Any] | None],
    order: tuple[int, ...],
    values: tuple[Any, ...],
    connection: Any,
    built: tuple[Any, ...] = (),
) -> list[Any]:
    """Rebuild a cached WHERE clause's parameters for ``values`` with Django's lookup classes.

    ``lookups[i]`` is the class and column of WHERE child ``i`` (None: a boolean
    compiled into the SQL text), ``order[i]`` the position of its value.
    ``built[position]``, when given and of that class, is the lookup already
    made for that value (by a recorded ``filter()``); the others are made here.
    Raises :class:`_UseDjango` when a value compiles to other SQL.
    """
    params: list[Any] = []
    try:
        for lookup, position in zip(lookups, order, strict=True):
            if lookup is not None:
                lookup_class, lhs = lookup
                made: Any = built[position] if position < len(built) else None
                if type(made) is not lookup_class:
                    made = lookup_class(lhs, values[position])
                rhs_sql, rhs = made.process_rhs(None, connection)
                if rhs_sql != "%s" or len(rhs) != 1:
                    raise _UseDjango  # this value compiles differently
                params.extend(rhs)
    except (EmptyResultSet, FullResultSet):
        # An integer out of the column's range: Django compiles no WHERE
        # clause (or runs no query) for it.
        raise _UseDjango from None
    return params


def _params(
    entry: _Entry, values: tuple[Any, ...], connection: Any, built: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Return a cached shape's parameters for ``values`` (raises :class:`_UseDjango`)."""
    lookup_params = _lookup_params(entry.lookups, entry.order, values, connection, built)
    return (*entry.prefix, *lookup_params)


def _fetch(
    entry: _Entry, alias: str, values: tuple[Any, ...], built: tuple[Any, ...], one: bool
) -> Any:
    """Execute a cached shape with ``values`` through Django's cursor; return its rows."""
    connection = connections[alias]
    params = _params(entry, values, connection, built)
    cursor = connection.cursor()
    try:
        cursor.execute(entry.sql, params)
        return cursor.fetchone() if one else cursor.fetchall()
    finally:
        cursor.close()


def _finish_get(entry: _Entry, alias: str, rows: Any, fetch_mode: Any) -> Any:
    """``get()``'s result from its rows."""
    num = len(rows)
    model: Any = entry.model
    if num == 1:
        return _rows_to_objects(entry, rows, alias, fetch_mode)[0]
    if not num:
        raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")
    raise model.MultipleObjectsReturned(
        "get() returned more than one {} -- it returned {}!".format(
            model._meta.object_name,
            num if num < MAX_GET_RESULTS else f"more than {MAX_GET_RESULTS - 1}",
        )
    )


def _finish_count(entry: _Entry, alias: str, row: Any, fetch_mode: Any) -> Any:
    """``count()``'s result from its one row, converted as ``get_aggregation()`` does."""
    if row is None:  # pragma: no cover - COUNT(*) always returns a row
        return 0
    value = row[0]
    if entry.converters:
        connection = connections[alias]
        for _, (convs, expression) in entry.converters:
            for converter in convs:
                value = converter(value, expression, connection)
    return value


def _finish_first(entry: _Entry, alias: str, rows: Any, fetch_mode: Any) -> Any:
    return _rows_to_objects(entry, rows, alias, fetch_mode)[0] if rows else None


def _finish_exists(entry: _Entry, alias: str, row: Any, fetch_mode: Any) -> bool:
    return row is not None


def _finish_iter(entry: _Entry, alias: str, rows: Any, fetch_mode: Any) -> list[Any]:
    return _rows_to_objects(entry, rows, alias, fetch_mode)


#: Per operation: how its result is made from the rows, and whether it reads one row.
_FINISH: dict[str, tuple[Callable[[_Entry, str, Any, Any], Any], bool]] = {
    "get": (_finish_get, False),
    "first": (_finish_first, False),
    "exists": (_finish_exists, True),
    "count": (_finish_count, True),
    "iter": (_finish_iter, False),
}


def _django_terminal(qs: QuerySet[Any], operation: str, kwargs: dict[str, Any]) -> Any:
    """Run ``operation`` through Django's own method (in the bridge)."""
    if operation == "get":
        return qs.get(**kwargs)
    if operation == "iter":
        qs._fetch_all()  # type: ignore[attr-defined]
        return qs._result_cache  # type: ignore[attr-defined]
    return getattr(qs, operation)()


def _miss(
    qs: QuerySet[Any], key: Hashable, alias: str, chain: _Chain, kwargs: dict[str, Any]
) -> Any:
    """Remember the shape's compiled form, then run Django's method (in the bridge)."""
    operation = key[0]  # type: ignore[index]
    try:
        # Django's own queryset for the chain: qs._chain() applies the
        # recorded calls to qs with Django's methods, then clones it.
        base = qs._chain()  # type: ignore[attr-defined]
        entry = _compile_operation(base, operation, alias, chain, kwargs)
    except Exception:  # e.g. a value Django rejects: its method raises it below
        pass  # nothing stored: the next call of the shape tries again
    else:
        _store(key, entry)
    return _django_terminal(qs, operation, kwargs)


def _run_hit(
    entry: _Entry,
    alias: str,
    qs: QuerySet[Any],
    operation: str,
    values: tuple[Any, ...],
    built: tuple[Any, ...],
    kwargs: dict[str, Any],
    fetch_mode: Any,
) -> Any:
    """Run a cache hit (in the bridge), or Django's method when the values call for it."""
    finish, one = _FINISH[operation]
    try:
        rows = _fetch(entry, alias, values, built, one)
    except _UseDjango:
        return _django_terminal(qs, operation, kwargs)
    return finish(entry, alias, rows, fetch_mode)


def _direct_ok(wrapper: Any) -> bool:
    """Return True if Django's cursor layer would add nothing to a query on ``wrapper``.

    A task-owned wrapper (not a test's pinned one) with no execute wrapper, no
    query logging (``DEBUG``, ``assertNumQueries``...), no transaction marked
    for rollback, no pending health check and connections held per task
    (not ``OPTIONS["release"] = "idle"``).
    """
    return (
        getattr(wrapper, "_loop", None) is not None
        and not wrapper.release_idle
        and not wrapper.execute_wrappers
        and not wrapper.needs_rollback
        and not wrapper.queries_logged
        and (not wrapper.health_check_enabled or wrapper.health_check_done)
    )


async def _hit(
    entry: _Entry,
    alias: str,
    qs: QuerySet[Any],
    operation: str,
    values: tuple[Any, ...],
    built: tuple[Any, ...],
    kwargs: dict[str, Any],
    fetch_mode: Any,
) -> Any:
    """Run a cache hit, in plain async code when nothing in it needs Django's sync layers.

    The direct road: the task's connection (if it has none yet:
    ``DatabaseWrapper.aconnect()``, else Django's ``connect()`` in a bridge),
    Django's own ``create_cursor()``, the query
    awaited on the loop (:meth:`BridgeConnection.aexecute`), errors wrapped by
    the wrapper's ``wrap_database_errors`` as ``CursorWrapper`` does, and the
    rows made into the result here when that runs no user code. Anything else
    (see :func:`_direct_ok`) runs the hit in a bridge, through Django's cursor.
    """
    wrapper: Any = connections[alias]
    if not _direct_ok(wrapper):
        return await run_sync(
            _run_hit, entry, alias, qs, operation, values, built, kwargs, fetch_mode
        )
    if wrapper.connection is None and not await wrapper.aconnect():
        await run_sync(wrapper.ensure_connection)
    view = wrapper.connection
    if type(view) is not BridgeConnection:
        return await run_sync(
            _run_hit, entry, alias, qs, operation, values, built, kwargs, fetch_mode
        )
    wrapper.validate_thread_sharing()
    global _direct_hits
    _direct_hits += 1
    try:
        params = _params(entry, values, wrapper, built)
    except _UseDjango:
        return await run_sync(_django_terminal, qs, operation, kwargs)
    except SynchronousOnlyOperation:  # a field's value preparation needs the database
        return await run_sync(
            _run_hit, entry, alias, qs, operation, values, built, kwargs, fetch_mode
        )
    finish, one = _FINISH[operation]
    with wrapper.wrap_database_errors:
        cursor = _hit_cursor(wrapper, view)
        try:
            await view.aexecute(cursor, entry.sql, params)
            rows = cursor.fetchone() if one else cursor.fetchall()
        except BaseException:
            view.hit_cursor = None
            cursor.close()
            raise
        cursor._reset()  # what close() frees: the result
    if entry.pure and not (signals.pre_init.receivers or signals.post_init.receivers):
        return finish(entry, alias, rows, fetch_mode)
    return await run_sync(finish, entry, alias, rows, fetch_mode)


#: Django's postgresql ``create_cursor()`` without its ``@async_unsafe`` guard
#: (the direct road calls it in plain async code; it does no I/O).
_create_cursor: Callable[[Any], Any] = pg_base.DatabaseWrapper.create_cursor.__wrapped__  # type: ignore[attr-defined]


def _hit_cursor(wrapper: Any, view: BridgeConnection) -> Any:
    """Return the cursor for a direct hit on ``view``: the last one's, or Django's new one.

    A cursor Django's ``create_cursor()`` made is kept on the connection for
    the next hit (a new one costs ~25k instructions), while it is what
    ``create_cursor()`` would make now: the wrapper's time zone is the same
    object, and the cursor still shares every adapter table with the
    connection (psycopg copies them on write, so an adapter registered on
    either side since shows; a cursor that got its own time zone loader is
    never reused).
    """
    kept = view.hit_cursor
    if kept is not None:
        cursor, timezone = kept
        if timezone is wrapper.timezone and _shares_adapters(cursor.adapters, view.adapters):
            return cursor
    cursor = _create_cursor(wrapper)
    view.hit_cursor = (cursor, wrapper.timezone)
    return cursor


def _shares_adapters(mine: Any, theirs: Any) -> bool:
    """Return True if psycopg ``AdaptersMap`` ``mine`` still shares all of ``theirs``'s tables."""
    dumpers, their_dumpers = mine._dumpers, theirs._dumpers
    return (
        mine._loaders[0] is theirs._loaders[0]
        and mine._loaders[1] is theirs._loaders[1]
        and mine._dumpers_by_oid[0] is theirs._dumpers_by_oid[0]
        and mine._dumpers_by_oid[1] is theirs._dumpers_by_oid[1]
        and dumpers[_AUTO] is their_dumpers[_AUTO]
        and dumpers[_TEXT] is their_dumpers[_TEXT]
        and dumpers[_BINARY] is their_dumpers[_BINARY]
        and mine.types._registry is theirs.types._registry
    )


_AUTO, _TEXT, _BINARY = PyFormat.AUTO, PyFormat.TEXT, PyFormat.BINARY


async def _run_cached(
    qs: QuerySet[Any], operation: str, chain: _Chain, kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    """Run ``operation`` (after ``chain``) from the cache if its shape allows.

    Returns (done, result); not done: the caller takes Django's path.
    """
    global _hits, _misses, _bypassed
    alias = qs.db
    if _alias_allowed(alias):
        sig = _value_sig(kwargs) if kwargs else ()
        if sig is not None:
            fetch_mode = getattr(qs, "_fetch_mode", None)
            key = (
                operation,
                type(qs),
                qs.model,
                alias,
                fetch_mode,
                tuple(op.sig for op in chain),
                sig,
            )
            try:
                entry = _cache[key]
            except KeyError:
                _misses += 1
                return True, await run_sync(_miss, qs, key, alias, chain, kwargs)
            if entry is not None:
                _hits += 1
                _cache.move_to_end(key)
                values: tuple[Any, ...] = ()
                built: tuple[Any, ...] = ()
                for op in chain:
                    if op.kind == "filter":
                        values += tuple(op.args.values())
                        built += op.built
                if kwargs:
                    values += tuple(kwargs.values())
                return True, await _hit(
                    entry, alias, qs, operation, values, built, kwargs, fetch_mode
                )
    _bypassed += 1
    return False, None


async def aget(self: QuerySet[Any], *args: Any, **kwargs: Any) -> Any:
    """Django's ``QuerySet.aget()``, reusing the compiled SQL of a repeated shape."""
    global _bypassed
    chain = self._deferred_filter  # type: ignore[attr-defined]
    if args:
        pass
    elif type(chain) is _Chain:
        if self._result_cache is None and _is_recorded(self):  # type: ignore[attr-defined]
            done, result = await _run_cached(self, "get", chain, kwargs)
            if done:
                return result
        else:
            _bypassed += 1
        return await _stock_aget(self, *args, **kwargs)
    elif kwargs and _is_pristine(self):
        done, result = await _run_cached(self, "get", _NO_CHAIN, kwargs)
        if done:
            return result
        return await _stock_aget(self, *args, **kwargs)
    _bypassed += 1
    return await _stock_aget(self, *args, **kwargs)


_NO_CHAIN = _Chain()


def _is_recorded(qs: QuerySet[Any]) -> bool:
    """Return True if nothing but recorded calls changed ``qs`` (cheap checks)."""
    return (
        qs._iterable_class is ModelIterable
        and qs._fields is None  # type: ignore[attr-defined]
        and not qs._prefetch_related_lookups  # type: ignore[attr-defined]
        and not qs._known_related_objects  # type: ignore[attr-defined]
    )


def _deferred_kwargs(qs: QuerySet[Any]) -> dict[str, Any] | None:
    """Return the kwargs of a pristine queryset with one recorded ``filter(**kw)`` only.

    None for anything else (no recorded call, other calls recorded, several
    filters, an evaluated queryset).
    """
    chain = qs._deferred_filter  # type: ignore[attr-defined]
    if (
        type(chain) is not _Chain
        or len(chain) != 1
        or chain[0].kind != "filter"
        or qs._result_cache is not None  # type: ignore[attr-defined]
        or not _is_pristine(qs, chain)
    ):
        return None
    return chain[0].args  # type: ignore[no-any-return]


_stock_aget: Callable[..., Any] = QuerySet.aget
_stock_filter: Callable[..., Any] = QuerySet.filter
_stock_order_by: Callable[..., Any] = QuerySet.order_by
_stock_select_related: Callable[..., Any] = QuerySet.select_related
_stock_getitem: Callable[..., Any] = QuerySet.__getitem__
_installed = False


def install() -> None:
    """Put the cached ``aget()``, the recorded calls and their terminals first.

    Idempotent.
    """
    global _installed, _stock_aget, _stock_filter, _stock_order_by
    global _stock_select_related, _stock_getitem
    if _installed:
        return
    _installed = True
    _stock_aget = QuerySet.aget
    _stock_filter = QuerySet.filter
    _stock_order_by = QuerySet.order_by
    _stock_select_related = QuerySet.select_related
    _stock_getitem = QuerySet.__getitem__
    aget.__qualname__ = "QuerySet.aget"
    QuerySet.aget = aget  # type: ignore[method-assign]
    from . import _fastpath_chain

    _fastpath_chain.install()
    setting_changed.connect(_on_setting_changed, dispatch_uid="django_async_db._fastpath")
    # A model class (re)defined at run time (isolate_apps, migrations' state
    # apps) may reuse a name: start afresh rather than keep stale shapes.
    signals.class_prepared.connect(_on_setting_changed, dispatch_uid="django_async_db._fastpath")
