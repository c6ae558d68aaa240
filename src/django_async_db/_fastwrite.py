"""Reuse compiled SQL for repeated writes (the write side of the compiled SQL cache).

``Book.objects.acreate(...)`` and ``book.asave()`` run Django's ``save()``
unchanged: ``save()``/``save_base()`` with their checks, ``pre_save`` and
``post_save`` signals, ``mark_for_rollback_on_error`` (or ``atomic`` for
multi-table inheritance), ``_save_table()`` with the fields' ``pre_save()``,
the primary key's default, ``select_on_save`` and the returned values set on
the instance. Only the two leaves that build and run SQL are taken over, in
the bridge and for aliases on this ENGINE, from the second call of a shape on:

- ``Model._do_insert()`` (the single-object ``InsertQuery`` of ``save()``):
  each field's ``pre_save()`` and ``get_db_prep_save()`` run in Django's order
  (field by field, as ``SQLInsertCompiler.as_sql()`` does), the INSERT ...
  RETURNING text Django compiled for the shape runs through Django's cursor
  wrapper, and the returned row goes through the columns' converters. The shape
  is the base manager, the alias, ``raw``, the field list and the returning
  fields.
- ``Model._do_update()`` (the UPDATE of an existing row by primary key, with or
  without ``update_fields``): the values ``_save_table()`` computed go through
  ``get_db_prep_save()``, the primary key through Django's ``Exact`` lookup,
  and the cached UPDATE runs; the result is what Django's returns (a row count
  turned into ``[()] * count`` on Django 6.1, a boolean on 5.2). Which values
  are None is part of the shape (Django 5.2 writes ``"col" = NULL``).

and ``filter(**lookups).aupdate(**values)`` on a deferred filter (see
:mod:`._fastpath`): values of plain types, the filter's lookups rebuilt by
Django's lookup classes, the UPDATE run inside ``mark_for_rollback_on_error``
like ``QuerySet.update()``; the row count is returned.

A first call (a miss) runs Django's own code: for an INSERT, ``QuerySet._insert``'s
three steps with a compiler that records the values it is given and the SQL it
returns (nothing is computed twice, so ``pre_save()`` runs once per field);
for an UPDATE, Django's path after a separate compilation. The entry is kept
only if the parameters rebuilt the cached way equal Django's, value and type.
Values that change the SQL (expressions, ``DatabaseDefault``, model instances,
values whose prepared form compiles, fields with ``get_placeholder_sql()``),
multi-table inheritance, custom managers or querysets and ``select_on_save``
take Django's path.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db import connections, transaction
from django.db.backends.base.operations import BaseDatabaseOperations
from django.db.models import Manager, Model
from django.db.models.expressions import Col, DatabaseDefault
from django.db.models.manager import BaseManager
from django.db.models.query import QuerySet
from django.db.models.sql import InsertQuery, UpdateQuery
from django.db.models.sql.where import AND

from . import _fastpath
from ._bridge import in_bridge, run_sync
from ._fastpath import (
    _alias_allowed,
    _deferred_kwargs,
    _is_pristine,
    _lookup_params,
    _same_params,
    _UseDjango,
    _value_sig,
)

__all__ = ["install"]

#: Value types that go through ``get_db_prep_save()`` without changing the SQL
#: text: any other value is checked for ``resolve_expression`` and friends.
_PLAIN = frozenset({int, str, float, Decimal, UUID, date, datetime, time, bytes, bool, type(None)})
#: Key types allowed for ``aupdate()``'s values (the filter's are the read cache's).
_PLAIN_FILTER = _PLAIN - {type(None)}

# Django 6.1 returns INSERT ... RETURNING rows with fetch_returned_rows(), 5.2
# one row with fetch_returned_insert_columns().
_FETCH_ROWS = hasattr(BaseDatabaseOperations, "fetch_returned_rows")


class _Insert:
    """A compiled single-object INSERT: the SQL and how to read what it returns."""

    __slots__ = ("converters", "fields", "manager", "model", "returning", "returning_params", "sql")

    def __init__(
        self,
        manager: Any,
        fields: list[Any],
        returning: list[Any],
        sql: str,
        returning_params: tuple[Any, ...],
        converters: list[tuple[int, tuple[list[Any], Any]]],
    ) -> None:
        # The manager and fields are kept alive: their ids are in the key.
        self.manager = manager
        self.model = manager.model
        self.fields = fields
        self.returning = returning
        self.sql = sql
        self.returning_params = returning_params
        self.converters = converters


class _Update:
    """A compiled UPDATE: the SQL, the fields set, the lookups of its WHERE clause."""

    __slots__ = ("fields", "lookups", "model", "order", "sql")

    def __init__(
        self,
        model: type[Model],
        sql: str,
        fields: list[Any],
        lookups: list[tuple[Callable[..., Any], Any] | None],
        order: tuple[int, ...],
    ) -> None:
        self.model = model
        self.sql = sql
        self.fields = fields
        self.lookups = lookups
        self.order = order


_cache: OrderedDict[Hashable, _Insert | _Update | None] = OrderedDict()
_lock = threading.Lock()
_hits = _misses = _bypassed = 0


def _info() -> tuple[int, int, int, int]:
    return _hits, _misses, _bypassed, len(_cache)


def _clear() -> None:
    global _hits, _misses, _bypassed
    with _lock:
        _cache.clear()
        _hits = _misses = _bypassed = 0


def _store(key: Hashable, entry: _Insert | _Update | None) -> None:
    with _lock:
        _cache[key] = entry
        while len(_cache) > _fastpath.MAX_ENTRIES:
            _cache.popitem(last=False)


def _plain_value(value: Any) -> bool:
    """Return True if Django sends ``value`` as one ``%s`` parameter after preparing it."""
    return type(value) in _PLAIN or not (
        isinstance(value, DatabaseDefault)
        or hasattr(value, "resolve_expression")
        or hasattr(value, "prepare_database_save")
    )


def _plain_prepared(prepared: Any) -> bool:
    return type(prepared) in _PLAIN or not hasattr(prepared, "as_sql")


def _has_placeholder(field: Any) -> bool:
    return hasattr(field, "get_placeholder_sql") or hasattr(field, "get_placeholder")


def _stock_manager(manager: Any) -> bool:
    """Return True if ``manager._insert(...)`` is Django's ``QuerySet._insert()``."""
    queryset_class = getattr(manager, "_queryset_class", None)
    return (
        type(manager)._insert is Manager._insert  # type: ignore[attr-defined]
        and type(manager).get_queryset is BaseManager.get_queryset
        and queryset_class is not None
        and queryset_class._insert is QuerySet._insert  # type: ignore[attr-defined]
        and queryset_class.__init__ is QuerySet.__init__
    )


# --- INSERT ------------------------------------------------------------------------


def _do_insert(
    self: Model, manager: Any, using: str, fields: list[Any], returning_fields: Any, raw: bool
) -> Any:
    """Django's ``Model._do_insert()``, reusing the compiled INSERT of a repeated shape."""
    global _hits, _misses, _bypassed
    if not in_bridge() or not _alias_allowed(using):
        return _stock_do_insert(self, manager, using, fields, returning_fields, raw)
    key = (id(manager), using, raw, *map(id, fields), None, *map(id, returning_fields))
    try:
        entry = _cache[key]
    except KeyError:
        if not _insert_cacheable(self, manager, fields, returning_fields, using):
            if self._meta.concrete_model is manager.model:
                _store(key, None)  # the model's shape: Django's path every time
            _bypassed += 1
            return _stock_do_insert(self, manager, using, fields, returning_fields, raw)
        _misses += 1
        return _django_insert(self, manager, using, fields, returning_fields, raw, learn=key)
    if entry is None or type(self)._meta.concrete_model is not entry.model:  # type: ignore[union-attr]
        _bypassed += 1  # not cacheable, or a child's INSERT into a parent table
        return _stock_do_insert(self, manager, using, fields, returning_fields, raw)
    assert isinstance(entry, _Insert)
    connection = connections[using]
    # SQLInsertCompiler.as_sql(): pre_save_val() then prepare_value(), field by field.
    values: list[Any] = []
    params: list[Any] = []
    for field in fields:
        value = getattr(self, field.attname) if raw else field.pre_save(self, True)
        values.append(value)
        if not _plain_value(value):
            break
        prepared = field.get_db_prep_save(value, connection=connection)
        params.append(prepared)
        if not _plain_prepared(prepared):
            break
    else:
        _hits += 1
        _cache.move_to_end(key)
        with connection.cursor() as cursor:
            cursor.execute(entry.sql, (*params, *entry.returning_params))
            if not returning_fields:
                return []
            if _FETCH_ROWS:
                rows = connection.ops.fetch_returned_rows(cursor, entry.returning_params)
            else:
                rows = [
                    connection.ops.fetch_returned_insert_columns(  # type: ignore[attr-defined]
                        cursor, entry.returning_params
                    )
                ]
        if entry.converters:
            rows = list(_converted(rows, entry.converters, connection))
        return list(rows)
    # A value Django compiles (an expression, DatabaseDefault ...): Django's path,
    # given the values already computed so that nothing runs twice.
    _bypassed += 1
    return _django_insert(
        self, manager, using, fields, returning_fields, raw, known=(values, params)
    )


def _insert_cacheable(
    obj: Model, manager: Any, fields: list[Any], returning_fields: Any, using: str
) -> bool:
    """Return True if the INSERT of this shape is a plain single-table one."""
    model: Any = manager.model
    connection = connections[using]
    return (
        bool(fields)
        and not model._meta.parents  # multi-table inheritance: Django's path
        and obj._meta.concrete_model is model
        and _stock_manager(manager)
        and not any(_has_placeholder(f) for f in fields)
        and (not returning_fields or connection.features.can_return_columns_from_insert)
        and type(connection.ops).modify_insert_params is BaseDatabaseOperations.modify_insert_params
    )


def _django_insert(
    obj: Model,
    manager: Any,
    using: str,
    fields: list[Any],
    returning_fields: Any,
    raw: bool,
    known: tuple[list[Any], list[Any]] = ([], []),
    learn: Hashable | None = None,
) -> Any:
    """Run ``QuerySet._insert([obj], ...)`` as Django does, through a recording compiler.

    ``known`` holds the values (``pre_save()``) and prepared parameters
    already computed for the first fields: the compiler is given them instead
    of computing them again. With ``learn``, the compiled shape is stored
    under that key if the recorded parameters prove it reusable.
    """
    known_values, known_prepared = known
    query = InsertQuery(manager.model, on_conflict=None, update_fields=None, unique_fields=None)
    query.insert_values(fields, [obj], raw=raw)
    compiler = query.get_compiler(using=using)
    stock_pre_save_val = compiler.pre_save_val
    stock_prepare_value = compiler.prepare_value
    stock_as_sql = compiler.as_sql
    seen_values: list[Any] = []
    seen_prepared: list[Any] = []
    statements: list[Any] = []

    def pre_save_val(field: Any, o: Any) -> Any:
        i = len(seen_values)
        value = known_values[i] if i < len(known_values) else stock_pre_save_val(field, o)
        seen_values.append(value)
        return value

    def prepare_value(field: Any, value: Any) -> Any:
        i = len(seen_prepared)
        prepared = (
            known_prepared[i] if i < len(known_prepared) else stock_prepare_value(field, value)
        )
        seen_prepared.append(prepared)
        return prepared

    def as_sql() -> Any:
        result = stock_as_sql()
        statements.extend(result)
        return result

    compiler.pre_save_val = pre_save_val  # type: ignore[method-assign]
    compiler.prepare_value = prepare_value  # type: ignore[method-assign]
    compiler.as_sql = as_sql  # type: ignore[method-assign]
    rows = compiler.execute_sql(returning_fields)
    if learn is not None:
        entry = _learn_insert(
            compiler, manager, fields, returning_fields, seen_values, seen_prepared, statements
        )
        if entry is not None:
            _store(learn, entry)
    return rows


def _learn_insert(
    compiler: Any,
    manager: Any,
    fields: list[Any],
    returning_fields: Any,
    values: list[Any],
    prepared: list[Any],
    statements: list[Any],
) -> _Insert | None:
    """Return the entry of an INSERT Django just ran, if it is reusable as is."""
    if (
        len(statements) != 1
        or len(values) != len(fields)
        or len(prepared) != len(fields)
        or not all(_plain_value(v) for v in values)
        or not all(_plain_prepared(p) for p in prepared)
    ):
        return None
    sql, params = statements[0]
    returning_params = tuple(compiler.returning_params)
    # One "%s" per field, in field order, then the RETURNING clause's parameters.
    if not _same_params([*prepared, *returning_params], list(params)):
        return None
    converters: list[Any] = []
    if returning_fields:
        table = manager.model._meta.db_table
        cols = [f.get_col(table) for f in returning_fields]
        converters = list(compiler.get_converters(cols).items())
    return _Insert(
        manager, list(fields), list(returning_fields or ()), sql, returning_params, converters
    )


def _converted(rows: Any, converters: list[Any], connection: Any) -> Any:
    """Apply column converters to rows as ``SQLCompiler.apply_converters()`` does."""
    for row in map(list, rows):
        for pos, (convs, expression) in converters:
            value = row[pos]
            for converter in convs:
                value = converter(value, expression, connection)
            row[pos] = value
        yield row


# --- UPDATE of one row by primary key (save()) -----------------------------------


def _do_update(
    self: Model,
    base_qs: QuerySet[Any],
    using: str,
    pk_val: Any,
    values: list[Any],
    update_fields: Any,
    forced_update: Any,
    returning_fields: Any = None,
) -> Any:
    """Django's ``Model._do_update()``, reusing the compiled UPDATE of a repeated shape.

    ``returning_fields`` is Django 6.1's argument (absent on 5.2, where the
    result is a boolean).
    """
    global _hits, _misses, _bypassed

    def stock() -> Any:
        if returning_fields is None:
            return _stock_do_update(
                self, base_qs, using, pk_val, values, update_fields, forced_update
            )
        return _stock_do_update(
            self, base_qs, using, pk_val, values, update_fields, forced_update, returning_fields
        )

    if not in_bridge() or not _alias_allowed(using):
        return stock()
    model = base_qs.model
    if (
        not values
        or returning_fields  # generated fields or expressions: UPDATE ... RETURNING
        or (self._meta.select_on_save and not forced_update)
        or type(pk_val) not in _PLAIN_FILTER
        or not all(_plain_value(v) for _, _, v in values)
        or self._meta.concrete_model is not model
        or model._meta.parents
        or not _is_pristine(base_qs)  # a base manager that filters or orders
    ):
        _bypassed += 1
        return stock()
    # None is in the key: Django 5.2 writes "col" = NULL into the SQL text.
    key = (
        "save",
        type(base_qs),
        model,
        using,
        type(pk_val),
        *[(id(f), v is None) for f, _, v in values],
    )
    try:
        entry = _cache[key]
    except KeyError:
        _misses += 1
        try:
            entry = _compile_row_update(base_qs, using, pk_val, values)
        except Exception:  # Django's path raises it below
            pass
        else:
            _store(key, entry)
        return stock()
    if entry is None:
        _bypassed += 1
        return stock()
    assert isinstance(entry, _Update)
    connection = connections[using]
    try:
        # Django's order: the pk lookup (filter()), then the values (as_sql()).
        where = _lookup_params(entry.lookups, entry.order, (pk_val,), connection)
        params = [_prepared(field, value, connection) for field, _, value in values]
    except _UseDjango:
        _bypassed += 1
        return stock()
    _hits += 1
    _cache.move_to_end(key)
    count = _execute_row_count(connection, entry.sql, params + where)
    if returning_fields is None:
        return count > 0  # Django 5.2
    return [()] * count  # Django 6.1: execute_returning_sql() without returning fields


def _prepared(field: Any, value: Any, connection: Any) -> Any:
    prepared = field.get_db_prep_save(value, connection=connection)
    if not _plain_prepared(prepared):
        raise _UseDjango
    return prepared


def _compile_row_update(
    base_qs: QuerySet[Any], using: str, pk_val: Any, values: list[Any]
) -> _Update | None:
    """Compile ``_do_update()``'s UPDATE the way Django does; return its entry, or None."""
    with warnings.catch_warnings():
        # Django's path warns (naive datetimes ...) when it runs right after.
        warnings.simplefilter("ignore")
        filtered = base_qs.filter(pk=pk_val)  # in the bridge: Django's filter()
        query: Any = filtered.query.chain(UpdateQuery)
        query.add_update_fields(values)
        query.annotations = {}
        return _compile_update(
            query, using, [f for f, _, _ in values], [v for _, _, v in values], {"pk": pk_val}
        )


def _compile_update(
    query: Any, using: str, fields: list[Any], values: list[Any], filters: dict[str, Any]
) -> _Update | None:
    """Build the entry of an UPDATE query whose WHERE clause is ``filters`` (equalities)."""
    if query.related_updates or len(query.values) != len(fields):
        return None  # a parent's field (multi-table inheritance), a generated field
    if any(_has_placeholder(f) for f in fields):
        return None
    connection = connections[using]
    compiler = query.get_compiler(using=using)
    sql, params = compiler.as_sql()
    if query.related_updates:
        return None
    prepared = [
        field.get_db_prep_save(v, connection=connection)
        for field, v in zip(fields, values, strict=True)
    ]
    if not all(_plain_prepared(p) for p in prepared):
        return None
    names = list(filters)
    where = query.where
    if where.connector != AND or where.negated or len(where.children) != len(names):
        return None
    # Q() sorts keyword lookups: child i is the i-th name in sorted order.
    order = tuple(names.index(name) for name in sorted(names))
    lookups: list[tuple[Callable[..., Any], Any] | None] = []
    for child, position in zip(list(where.children), order, strict=True):
        if getattr(child, "lookup_name", None) != "exact" or type(child.lhs) is not Col:
            return None
        value = filters[names[position]]
        _, child_params = compiler.compile(child)
        if not child_params and type(value) is bool:
            lookups.append(None)  # "col" / NOT "col": the value (in the key) is in the SQL
            continue
        lookups.append((type(child), child.lhs))
    entry = _Update(query.model, sql, list(fields), lookups, order)
    try:
        rebuilt = prepared + _lookup_params(
            entry.lookups, entry.order, tuple(filters.values()), connection
        )
    except _UseDjango:
        return None
    if not _same_params(rebuilt, list(params)):
        return None
    return entry


def _execute_row_count(connection: Any, sql: str, params: list[Any]) -> int:
    """Run an UPDATE as ``SQLCompiler.execute_sql(ROW_COUNT)`` does; return the row count."""
    cursor = connection.cursor()
    try:
        cursor.execute(sql, tuple(params))
    except Exception:
        cursor.close()
        raise
    try:
        return cursor.rowcount  # type: ignore[no-any-return]
    finally:
        cursor.close()


# --- filter(**lookups).aupdate(**values) ------------------------------------------


def _aupdate_key(
    qs: QuerySet[Any], alias: str, filters: dict[str, Any], values: dict[str, Any]
) -> Hashable | None:
    filter_sig = _value_sig(filters)
    if filter_sig is None:
        return None
    parts: list[Any] = ["aupdate", type(qs), qs.model, alias, *filter_sig, None]
    for name, value in values.items():
        kind = type(value)
        if kind not in _PLAIN:
            return None
        parts.append((name, kind))
    return tuple(parts)


def _compile_aupdate(
    qs: QuerySet[Any], alias: str, filters: dict[str, Any], values: dict[str, Any]
) -> _Update | None:
    """Compile ``qs.update(**values)`` the way ``QuerySet.update()`` does, up to ``as_sql()``."""
    if any(
        "__" in (name[: -len("__exact")] if name.endswith("__exact") else name) for name in filters
    ):
        return None  # a path through relations or another lookup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Django's update() runs (and warns) right after
        query = qs._chain().query.chain(UpdateQuery)  # type: ignore[attr-defined]
        query.add_update_values(values)
        if query.order_by:
            return None
        query.clear_select_clause()
        fields = [f for f, _, _ in query.values]
        return _compile_update(query, alias, fields, [v for _, _, v in query.values], filters)


def _miss_aupdate(
    qs: QuerySet[Any], key: Hashable, alias: str, filters: dict[str, Any], values: dict[str, Any]
) -> Any:
    try:
        entry = _compile_aupdate(qs, alias, filters, values)
    except Exception:  # e.g. an unknown field: update() raises it below
        pass
    else:
        _store(key, entry)
    return qs.update(**values)


def _hit_aupdate(
    qs: QuerySet[Any], entry: _Update, alias: str, filters: dict[str, Any], values: dict[str, Any]
) -> Any:
    """Run a cached ``update()`` shape (in the bridge), or Django's when a value calls for it."""
    connection = connections[alias]
    try:
        where = _lookup_params(entry.lookups, entry.order, tuple(filters.values()), connection)
    except _UseDjango:
        return qs.update(**values)
    use_django = False
    rows = 0
    with transaction.mark_for_rollback_on_error(using=alias):
        # As in update(): preparing the values may raise, and that marks the
        # transaction for rollback too.
        params = []
        for field, value in zip(entry.fields, values.values(), strict=True):
            prepared = field.get_db_prep_save(value, connection=connection)
            if not _plain_prepared(prepared):
                use_django = True
                break
            params.append(prepared)
        else:
            rows = _execute_row_count(connection, entry.sql, params + where)
    if use_django:
        return qs.update(**values)
    qs._result_cache = None  # type: ignore[attr-defined]
    return rows


async def aupdate(self: QuerySet[Any], **kwargs: Any) -> Any:
    """Django's ``QuerySet.aupdate()``, reusing the compiled UPDATE after a deferred filter."""
    global _hits, _misses, _bypassed
    filters = _deferred_kwargs(self) if kwargs else None
    if filters is not None:
        self._for_write = True  # type: ignore[attr-defined]  # update() sets it: self.db is the write alias
        alias = self.db
        if _alias_allowed(alias):
            key = _aupdate_key(self, alias, filters, kwargs)
            if key is None:
                _bypassed += 1
            else:
                try:
                    entry = _cache[key]
                except KeyError:
                    _misses += 1
                    return await run_sync(_miss_aupdate, self, key, alias, filters, kwargs)
                if entry is not None:
                    assert isinstance(entry, _Update)
                    _hits += 1
                    _cache.move_to_end(key)
                    return await run_sync(_hit_aupdate, self, entry, alias, filters, kwargs)
                _bypassed += 1
    return await _stock_aupdate(self, **kwargs)


aupdate.alters_data = True  # type: ignore[attr-defined]

_stock_do_insert: Callable[..., Any] = Model._do_insert  # type: ignore[attr-defined]
_stock_do_update: Callable[..., Any] = Model._do_update  # type: ignore[attr-defined]
_stock_aupdate: Callable[..., Any] = QuerySet.aupdate
_installed = False


def install() -> None:
    """Put the cached ``Model._do_insert()``/``_do_update()`` and ``QuerySet.aupdate()`` first.

    Idempotent. The entries are counted by ``compiled_sql_cache_info()`` and
    emptied with the read cache's.
    """
    global _installed, _stock_do_insert, _stock_do_update, _stock_aupdate
    if _installed:
        return
    _installed = True
    _stock_do_insert = Model._do_insert  # type: ignore[attr-defined]
    _stock_do_update = Model._do_update  # type: ignore[attr-defined]
    _stock_aupdate = QuerySet.aupdate
    _do_insert.__qualname__ = "Model._do_insert"
    _do_update.__qualname__ = "Model._do_update"
    aupdate.__qualname__ = "QuerySet.aupdate"
    Model._do_insert = _do_insert  # type: ignore[attr-defined]
    Model._do_update = _do_update  # type: ignore[method-assign,assignment]
    QuerySet.aupdate = aupdate  # type: ignore[method-assign]
    _fastpath.register_companion(_info, _clear)
