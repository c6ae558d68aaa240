"""Reuse compiled SQL for repeated query shapes (the compiled SQL cache).

``Book.objects.aget(pk=1)`` and ``Book.objects.aget(pk=2)`` differ only in a
parameter value, yet Django clones the queryset, resolves the lookup, joins
and compiles the SQL again on every call. On this ENGINE, ``aget()`` on a
*pristine* queryset (the one a stock manager hands out: no filter, ordering,
``select_related``, ``only``/``defer``, annotation ...) with keyword equality
lookups takes a shorter road from the second call of a shape on:

1. The shape key is computed without compiling: the queryset class, model,
   the alias the router chooses for this call, the fetch mode, the lookup
   names in call order and the exact type of each value (and the value itself
   for booleans, which Django compiles differently for ``True`` and ``False``).
2. On the first call of a shape (a miss), Django's path runs as usual; the
   same queryset is also compiled once by Django (``filter()``, ``order_by()``,
   ``set_limits()``, ``as_sql()``) and the cache entry keeps the SQL text, the
   lookup objects of the WHERE clause, the column converters and the model's
   attribute names. The entry is only kept if the parameters rebuilt from the
   lookups equal Django's own for that call; otherwise the shape is marked
   as "use Django's path" for good.
3. On a hit, the parameters are rebuilt with Django's own lookup classes
   (``Exact(col, value)`` → ``get_prep_value`` → ``get_db_prep_value``, so
   conversions and validation errors are Django's), the cached SQL runs through
   Django's cursor wrapper (``connection.cursor()``: execute wrappers, query
   logging, ``assertNumQueries`` and transaction checks apply), the column
   converters run as in ``SQLCompiler.apply_converters`` and rows become
   instances as in ``ModelIterable``: directly when the model has plain
   field descriptors, no ``__init__``/``from_db`` override and no
   ``pre_init``/``post_init`` receivers, through ``Model.from_db`` otherwise.

``filter(**lookups)`` in async code, on a pristine queryset and for a shape
Django accepted before, returns a clone whose filter is deferred with
Django's own ``_deferred_filter`` (the values are checked at once by the
lookup classes); ``afirst()``, ``aexists()`` and ``acount()`` on that
untouched clone take the same road as ``aget()``. Anything else reading
``.query`` makes Django apply the filter as usual.

Anything else (positional ``Q`` arguments, ``None`` or expression values,
lookups other than ``exact``, related-field paths, querysets with prior state,
custom queryset or query classes that change the methods involved) takes
Django's path unchanged. ``DATABASES[alias]["OPTIONS"]["compiled_sql_cache"] =
False`` turns the cache off for an alias.
"""

from __future__ import annotations

import threading
import weakref
from asyncio import _get_running_loop
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

from django.core.exceptions import EmptyResultSet, FullResultSet
from django.core.signals import setting_changed
from django.db import connections
from django.db.models import Count, Model, signals
from django.db.models.expressions import Col
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query import MAX_GET_RESULTS, ModelIterable, QuerySet
from django.db.models.query_utils import DeferredAttribute
from django.db.models.sql import Query
from django.db.models.sql.where import AND

from ._bridge import in_bridge, run_sync

__all__ = ["CacheInfo", "clear_compiled_sql_cache", "compiled_sql_cache_info", "install"]

ENGINE = "django_async_db.backends.postgresql"

#: How many query shapes the cache holds (least recently used ones go first).
MAX_ENTRIES = 1024

#: Value types whose preparation cannot change the SQL text (None, model
#: instances, expressions and querysets can: they take Django's path).
_PLAIN_TYPES = frozenset({int, str, float, Decimal, UUID, date, datetime, time, bytes})

#: ``QuerySet`` attributes ``get()``, ``first()``, ``exists()`` and ``count()``
#: rely on: a subclass overriding one of them takes Django's path.
_GET_METHODS = (
    "get",
    "first",
    "exists",
    "count",
    "filter",
    "_filter_or_exclude",
    "_filter_or_exclude_inplace",
    "order_by",
    "_chain",
    "_clone",
    "__len__",
    "_fetch_all",
    "db",
    "query",
    "__init__",
)

try:  # Django >= 6.1: fetch modes, from_db(..., fetch_mode=)
    from django.db.models.query import _get_from_db  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Django < 6.1
    _get_from_db = None


class CacheInfo(NamedTuple):
    """Counters of the compiled SQL cache (see :func:`compiled_sql_cache_info`)."""

    hits: int
    misses: int
    bypassed: int
    size: int
    max_size: int


class _Entry:
    """A compiled ``get()`` shape: SQL, lookups to rebuild parameters, row conversion."""

    __slots__ = (
        "attnames",
        "converters",
        "direct",
        "fk_positions",
        "lookups",
        "model",
        "order",
        "prefix",
        "sql",
    )

    def __init__(
        self,
        model: type[Model],
        sql: str,
        prefix: tuple[Any, ...],
        lookups: list[tuple[Callable[..., Any], Any] | None],
        order: tuple[int, ...],
        attnames: tuple[str, ...],
        converters: list[tuple[int, tuple[list[Any], Any]]],
        direct: bool,
        fk_positions: tuple[int, ...],
    ) -> None:
        self.model = model
        self.sql = sql
        self.prefix = prefix
        self.lookups = lookups
        self.order = order
        self.attnames = attnames
        self.converters = converters
        self.direct = direct
        self.fk_positions = fk_positions


_cache: OrderedDict[Hashable, _Entry | None] = OrderedDict()
_lock = threading.Lock()
_hits = _misses = _bypassed = 0
# QuerySet subclass -> its get() machinery is Django's
_stock_classes: dict[type, bool] = {QuerySet: True}
# model -> Query.__dict__ of a fresh query and of a chained (cloned) one
_pristine: dict[type[Model], tuple[dict[str, Any], dict[str, Any]]] = {}


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
        _filter_shapes.clear()
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

    With ``deferred``: what :func:`filter` returned, its filter still pending.
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


def _get_key(
    qs: QuerySet[Any], alias: str, kwargs: dict[str, Any], operation: str = "get"
) -> Hashable | None:
    """Return the shape key of ``operation`` with ``kwargs`` (None: use Django's path)."""
    parts: list[Any] = [operation, type(qs), qs.model, alias, getattr(qs, "_fetch_mode", None)]
    for name, value in kwargs.items():
        kind = type(value)
        if kind is bool:
            parts.append((name, value))
        elif kind in _PLAIN_TYPES:
            parts.append((name, kind))
        else:
            return None
    return tuple(parts)


def _direct_construction(model: type[Model], attnames: tuple[str, ...]) -> bool:
    """Return True if rows can become instances without calling ``Model.__init__``."""
    if (
        model.__init__ is not Model.__init__  # type: ignore[misc]
        or model.__new__ is not Model.__new__
        or model.__setattr__ is not Model.__setattr__  # __init__ sets fields with setattr()
        or model.from_db.__func__ is not Model.from_db.__func__  # type: ignore[attr-defined]
        or model._meta.abstract
    ):
        return False
    for name in attnames:
        descriptor = model.__dict__.get(name)
        if descriptor is None:
            descriptor = getattr(model, name, None)
        if type(descriptor) not in (DeferredAttribute, ForeignKeyDeferredAttribute):
            return False
    return True


def _has_init_receivers(model: type[Model]) -> bool:
    return bool(
        (signals.pre_init.receivers and signals.pre_init.has_listeners(model))
        or (signals.post_init.receivers and signals.post_init.has_listeners(model))
    )


def _plain_names(names: list[str]) -> bool:
    """Return True if every lookup is an equality on a field of the model itself."""
    for name in names:
        base = name[: -len("__exact")] if name.endswith("__exact") else name
        if "__" in base:
            return False  # a path through relations or another lookup
    return True


def _compile_get(qs: QuerySet[Any], alias: str, kwargs: dict[str, Any]) -> _Entry | None:
    """Compile ``qs.get(**kwargs)`` the way Django does; return its entry, or None.

    Runs in the bridge (compiling may need the server version).
    """
    if not _plain_names(list(kwargs)):
        return None
    clone = _stock_filter(qs, **kwargs)
    clone = clone.order_by()  # get() on a pristine queryset: can_filter(), no distinct
    clone.query.set_limits(high=MAX_GET_RESULTS)
    return _compile(clone.query, qs.model, alias, kwargs, instances=True)


def _compile_first(filtered: QuerySet[Any], alias: str, kwargs: dict[str, Any]) -> _Entry | None:
    """Compile ``filtered.first()`` the way Django does (``filtered``: filter() applied)."""
    if not _plain_names(list(kwargs)):
        return None
    if filtered.ordered or not filtered.query.default_ordering:
        queryset = filtered
    else:
        queryset = filtered.order_by("pk")
    return _compile(queryset[:1].query, filtered.model, alias, kwargs, instances=True)


def _compile_exists(filtered: QuerySet[Any], alias: str, kwargs: dict[str, Any]) -> _Entry | None:
    """Compile ``filtered.exists()`` the way Django does (``Query.has_results()``)."""
    if not _plain_names(list(kwargs)):
        return None
    return _compile(filtered.query.exists(), filtered.model, alias, kwargs, instances=False)


def _compile_count(filtered: QuerySet[Any], alias: str, kwargs: dict[str, Any]) -> _Entry | None:
    """Compile ``filtered.count()`` the way Django does (``Query.get_count()``).

    ``Query.get_aggregation()`` for a query without annotations, grouping,
    slicing, distinct or combinator (a pristine queryset, filtered) takes its
    no-subquery branch; these are its steps, up to ``as_sql()``.
    """
    if not _plain_names(list(kwargs)):
        return None
    query = filtered.query.clone()
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
    entry = _compile(query, filtered.model, alias, kwargs, instances=False)
    if entry is not None:
        compiler = query.get_compiler(using=alias)
        cols = list(query.annotation_select.values())
        if compiler.has_composite_fields(cols):
            return None
        entry.converters = list(compiler.get_converters(cols).items())
    return entry


def _compile(
    query: Query, model: type[Model], alias: str, kwargs: dict[str, Any], *, instances: bool
) -> _Entry | None:
    """Build the entry for a compiled query whose WHERE clause is the keyword lookups."""
    names = list(kwargs)
    connection = connections[alias]
    compiler = query.get_compiler(using=alias)
    sql, params = compiler.as_sql()
    where = query.where
    if where.connector != AND or where.negated or len(where.children) != len(names):
        return None
    # Q() sorts keyword lookups: child i is the i-th name in sorted order.
    order = tuple(names.index(name) for name in sorted(names))
    lookups: list[tuple[Callable[..., Any], Any] | None] = []
    rebuilt: list[Any] = []
    children: list[Any] = list(where.children)
    for child, position in zip(children, order, strict=True):
        if getattr(child, "lookup_name", None) != "exact" or type(child.lhs) is not Col:
            return None
        value = kwargs[names[position]]
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
    # The WHERE clause's parameters come last (LIMIT is inlined); anything
    # before them belongs to the SELECT list (exists()'s "1 AS a"): constants.
    _, where_params = compiler.compile(where)
    split = len(params) - len(where_params)
    if (
        split < 0
        or not _same_params(rebuilt, where_params)
        or not _same_params(params[split:], where_params)
    ):
        return None
    prefix = tuple(params[:split])
    if not instances:
        return _Entry(model, sql, prefix, lookups, order, (), [], False, ())
    klass_info = compiler.klass_info
    if (
        not klass_info
        or klass_info.get("related_klass_infos")
        or compiler.annotation_col_map
        or compiler.has_extra_select
        or len(compiler.select) != compiler.col_count
        or klass_info["model"] is not model
    ):
        return None
    fields = [s[0] for s in compiler.select]
    if compiler.has_composite_fields(fields):
        return None
    attnames = tuple(f.target.attname for f in fields)
    if list(attnames) != [f.attname for f in model._meta.concrete_fields]:
        return None
    if list(klass_info["select_fields"]) != list(range(len(fields))):
        return None
    converters = list(compiler.get_converters(fields).items())
    fk_positions = tuple(
        i
        for i, name in enumerate(attnames)
        if type(getattr(model, name, None)) is ForeignKeyDeferredAttribute
    )
    return _Entry(
        model,
        sql,
        prefix,
        lookups,
        order,
        attnames,
        converters,
        _direct_construction(model, attnames),
        fk_positions,
    )


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


def _miss_get(qs: QuerySet[Any], key: Hashable, alias: str, kwargs: dict[str, Any]) -> Any:
    """Remember the shape's compiled form, then run Django's ``get()`` (in the bridge)."""
    try:
        entry = _compile_get(qs, alias, kwargs)
    except Exception:  # e.g. a value Django rejects: get() raises it below
        pass  # nothing stored: the next call of the shape tries again
    else:
        _store(key, entry)
    return qs.get(**kwargs)


def _rows_to_objects(entry: _Entry, rows: list[Any], alias: str, fetch_mode: Any) -> list[Any]:
    """Turn result rows into instances exactly as ``ModelIterable`` does."""
    model = entry.model
    connection = connections[alias]
    if entry.converters:
        converted = []
        for row in rows:
            row = list(row)
            for pos, (convs, expression) in entry.converters:
                value = row[pos]
                for converter in convs:
                    value = converter(value, expression, connection)
                row[pos] = value
            converted.append(row)
        rows = converted
    objs: list[Any] = []
    if entry.direct and not _has_init_receivers(model):
        from django.db.models.base import ModelState

        attnames = entry.attnames
        fk_positions = entry.fk_positions
        new = object.__new__
        for row in rows:
            obj = new(model)
            state = ModelState()
            if any(row[i] is not None for i in fk_positions):
                # Model.__init__ sets FKs through their descriptor, which
                # creates the instance's (empty) related-object cache.
                state.fields_cache = {}
            obj.__dict__["_state"] = state
            obj.__dict__.update(zip(attnames, row, strict=True))
            state.adding = False
            state.db = alias
            if fetch_mode is not None:
                state.fetch_mode = fetch_mode
            objs.append(obj)
    else:
        # Django < 6.1 has no fetch modes (and no _get_from_db).
        from_db = _get_from_db(model, fetch_mode) if _get_from_db is not None else model.from_db
        attnames_list = list(entry.attnames)
        objs = [from_db(alias, attnames_list, row) for row in rows]
    if fetch_mode is not None and fetch_mode.track_peers:
        peers: list[Any] = []
        for obj in objs:
            peers.append(weakref.ref(obj))
            obj._state.peers = peers
    return objs


class _UseDjango(Exception):
    """Raised by a hit whose values change the SQL: this call takes Django's path."""


def _fetch(entry: _Entry, alias: str, values: tuple[Any, ...], one: bool = False) -> Any:
    """Execute a cached shape with ``values`` through Django's cursor; return its rows."""
    connection = connections[alias]
    params = list(entry.prefix)
    try:
        for lookup, position in zip(entry.lookups, entry.order, strict=True):
            if lookup is not None:
                lookup_class, lhs = lookup
                rhs = lookup_class(lhs, values[position]).process_rhs(None, connection)
                params.extend(rhs[1])
    except (EmptyResultSet, FullResultSet):
        # An integer out of the column's range: Django compiles no WHERE
        # clause (or runs no query) for it.
        raise _UseDjango from None
    cursor = connection.cursor()
    try:
        cursor.execute(entry.sql, tuple(params))
        return cursor.fetchone() if one else cursor.fetchall()
    finally:
        cursor.close()


def _hit_get(entry: _Entry, alias: str, values: tuple[Any, ...], fetch_mode: Any) -> Any:
    """Run a cached ``get()`` shape (in the bridge)."""
    rows = _fetch(entry, alias, values)
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


async def aget(self: QuerySet[Any], *args: Any, **kwargs: Any) -> Any:
    """Django's ``QuerySet.aget()``, reusing the compiled SQL of a repeated shape."""
    global _bypassed
    if not args and kwargs and _is_pristine(self):
        done, result = await _cached(self, "get", kwargs, _miss_get, _hit_get)
        if done:
            return result
    else:
        _bypassed += 1
    return await _stock_aget(self, *args, **kwargs)


class _FilterShape(NamedTuple):
    """The lookups Django built for a ``filter(**lookups)`` shape: to check values with."""

    lookups: list[tuple[Callable[..., Any], Any]]
    order: tuple[int, ...]


# ("filter", queryset class, model, names and value types) -> shape, or None:
# the filter() shapes Django accepted, whose later calls are deferred.
_filter_shapes: OrderedDict[Hashable, _FilterShape | None] = OrderedDict()


def _filter_shape(filtered: QuerySet[Any], kwargs: dict[str, Any]) -> _FilterShape | None:
    """Return the lookups of a queryset just filtered by Django with ``kwargs``."""
    names = list(kwargs)
    if not _plain_names(names):
        return None
    where = filtered.query.where
    if where.connector != AND or where.negated or len(where.children) != len(names):
        return None
    children: list[Any] = list(where.children)
    if any(getattr(c, "lookup_name", None) != "exact" or type(c.lhs) is not Col for c in children):
        return None
    order = tuple(names.index(name) for name in sorted(names))
    return _FilterShape([(type(c), c.lhs) for c in children], order)


def filter(self: QuerySet[Any], *args: Any, **kwargs: Any) -> QuerySet[Any]:
    """Django's ``QuerySet.filter()``; in async code, on a pristine queryset, deferred.

    A shape Django already accepted (same model, lookup names and value types)
    returns a clone whose filter is deferred with Django's own mechanism
    (``_deferred_filter``, applied by Django the first time anything reads
    ``.query``), after checking the values as Django's lookups do (so a bad
    value raises here, as in Django). ``afirst()`` and ``aexists()`` on such a
    clone run their cached SQL without applying it.
    """
    if (
        args
        or not kwargs
        or _get_running_loop() is None  # sync code
        or in_bridge()  # sync code run by run_sync(): get(), signal receivers ...
        or not _is_pristine(self)
    ):
        return _stock_filter(self, *args, **kwargs)  # type: ignore[no-any-return]
    key = _get_key(self, "", kwargs, "filter")
    if key is None:
        return _stock_filter(self, *args, **kwargs)  # type: ignore[no-any-return]
    try:
        shape = _filter_shapes[key]
    except KeyError:
        filtered: QuerySet[Any] = _stock_filter(self, **kwargs)  # raises what Django raises
        shape = _filter_shape(filtered, kwargs)
        with _lock:
            _filter_shapes[key] = shape
            if len(_filter_shapes) > MAX_ENTRIES:
                _filter_shapes.popitem(last=False)
        return filtered
    if shape is None or not _alias_allowed(self.db):
        return _stock_filter(self, **kwargs)  # type: ignore[no-any-return]
    values = tuple(kwargs.values())
    for (lookup_class, lhs), position in zip(shape.lookups, shape.order, strict=True):
        lookup_class(lhs, values[position])  # Django's value checks and conversions
    clone = self._chain()  # type: ignore[attr-defined]
    marker = (False, (), kwargs)
    clone._deferred_filter = marker
    clone.__dict__["_fastpath_filter"] = marker
    return clone  # type: ignore[no-any-return]


def _deferred_kwargs(qs: QuerySet[Any]) -> dict[str, Any] | None:
    """Return the keyword lookups of a :func:`filter` clone still untouched, else None."""
    marker = qs.__dict__.get("_fastpath_filter")
    if marker is None or qs._result_cache is not None or not _is_pristine(qs, marker):  # type: ignore[attr-defined]
        return None
    return marker[2]  # type: ignore[no-any-return]


def _learn_then_run(
    compile_entry: Callable[[QuerySet[Any], str, dict[str, Any]], _Entry | None], terminal: str
) -> Callable[[QuerySet[Any], Hashable, str, dict[str, Any]], Any]:
    """Make the miss of a filtered shape's ``terminal``: remember its entry, run Django's."""

    def miss(qs: QuerySet[Any], key: Hashable, alias: str, kwargs: dict[str, Any]) -> Any:
        try:
            entry = compile_entry(qs._chain(), alias, kwargs)  # type: ignore[attr-defined]
        except Exception:  # not cacheable: Django's path every time
            pass
        else:
            _store(key, entry)
        return getattr(qs, terminal)()

    return miss


_miss_first = _learn_then_run(_compile_first, "first")
_miss_exists = _learn_then_run(_compile_exists, "exists")
_miss_count = _learn_then_run(_compile_count, "count")


def _hit_count(entry: _Entry, alias: str, values: tuple[Any, ...], fetch_mode: Any) -> Any:
    """Run a cached ``count()`` shape: one row, converted as ``get_aggregation()`` does."""
    row = _fetch(entry, alias, values, one=True)
    if row is None:  # pragma: no cover - COUNT(*) always returns a row
        return 0
    value = row[0]
    if entry.converters:
        connection = connections[alias]
        for _, (convs, expression) in entry.converters:
            for converter in convs:
                value = converter(value, expression, connection)
    return value


def _hit_first(entry: _Entry, alias: str, values: tuple[Any, ...], fetch_mode: Any) -> Any:
    rows = _fetch(entry, alias, values)
    return _rows_to_objects(entry, rows, alias, fetch_mode)[0] if rows else None


def _hit_exists(entry: _Entry, alias: str, values: tuple[Any, ...], fetch_mode: Any) -> bool:
    return _fetch(entry, alias, values, one=True) is not None


def _run_hit(
    hit: Callable[..., Any],
    entry: _Entry,
    alias: str,
    qs: QuerySet[Any],
    kwargs: dict[str, Any],
    fetch_mode: Any,
) -> Any:
    """Run a cache hit (in the bridge), or Django's method when the values call for it."""
    try:
        return hit(entry, alias, tuple(kwargs.values()), fetch_mode)
    except _UseDjango:
        if hit is _hit_get:
            return qs.get(**kwargs)
        if hit is _hit_count:
            return qs.count()
        return qs.first() if hit is _hit_first else qs.exists()


async def _cached(
    qs: QuerySet[Any],
    operation: str,
    kwargs: dict[str, Any],
    miss: Callable[..., Any],
    hit: Callable[..., Any],
) -> tuple[bool, Any]:
    """Run ``operation`` from the cache if its shape allows; return (done, result)."""
    global _hits, _misses, _bypassed
    alias = qs.db
    if _alias_allowed(alias) and (key := _get_key(qs, alias, kwargs, operation)) is not None:
        try:
            entry = _cache[key]
        except KeyError:
            _misses += 1
            return True, await run_sync(miss, qs, key, alias, kwargs)
        if entry is not None:
            _hits += 1
            _cache.move_to_end(key)
            fetch_mode = getattr(qs, "_fetch_mode", None)
            return True, await run_sync(_run_hit, hit, entry, alias, qs, kwargs, fetch_mode)
    _bypassed += 1
    return False, None


def _filtered_terminal(
    name: str,
    miss: Callable[[QuerySet[Any], Hashable, str, dict[str, Any]], Any],
    hit: Callable[[_Entry, str, tuple[Any, ...], Any], Any],
) -> Callable[[QuerySet[Any]], Coroutine[Any, Any, Any]]:
    """Make Django's ``QuerySet.a<name>()``, from the cache after a deferred :func:`filter`."""

    async def terminal(self: QuerySet[Any]) -> Any:
        kwargs = _deferred_kwargs(self)
        if kwargs is not None:
            done, result = await _cached(self, name, kwargs, miss, hit)
            if done:
                return result
        return await _stock_terminals[name](self)

    terminal.__name__ = f"a{name}"
    terminal.__doc__ = (
        f"Django's ``QuerySet.a{name}()``, from the cache after a deferred :func:`filter`."
    )
    return terminal


afirst = _filtered_terminal("first", _miss_first, _hit_first)
aexists = _filtered_terminal("exists", _miss_exists, _hit_exists)
acount = _filtered_terminal("count", _miss_count, _hit_count)

_stock_aget: Callable[..., Any]
# Django's afirst/aexists/acount by terminal name ("first", ...), kept by install().
_stock_terminals: dict[str, Callable[..., Any]] = {}
_stock_filter: Callable[..., Any] = QuerySet.filter
_installed = False


def install() -> None:
    """Put the cached ``aget()``, ``afirst()``, ``aexists()``, ``acount()`` and ``filter()`` first.

    Idempotent.
    """
    global _installed, _stock_aget, _stock_filter
    if _installed:
        return
    _installed = True
    _stock_aget = QuerySet.aget
    _stock_terminals.update(first=QuerySet.afirst, exists=QuerySet.aexists, count=QuerySet.acount)
    _stock_filter = QuerySet.filter
    for name, function in (
        ("aget", aget),
        ("afirst", afirst),
        ("aexists", aexists),
        ("acount", acount),
        ("filter", filter),
    ):
        function.__qualname__ = f"QuerySet.{name}"
        setattr(QuerySet, name, function)
    setting_changed.connect(_on_setting_changed, dispatch_uid="django_async_db._fastpath")
    # A model class (re)defined at run time (isolate_apps, migrations' state
    # apps) may reuse a name: start afresh rather than keep stale shapes.
    signals.class_prepared.connect(_on_setting_changed, dispatch_uid="django_async_db._fastpath")
