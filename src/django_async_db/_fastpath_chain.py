"""Record a pristine queryset's calls in async code, for the compiled SQL cache.

In async code (not in sync code, nor in sync code run by ``run_sync()``),
these calls on a *pristine* queryset (what a stock manager hands out) or on
a queryset they returned are recorded instead of applied:

- ``filter(**lookups)`` (``exact``, ``gt``, ``gte``, ``lt``, ``lte``,
  ``iexact``, ``(i)contains``, ``(i)startswith``, ``(i)endswith`` on a field
  of the model itself, values of a plain type), for a lookup shape Django
  accepted before; the values are checked at once by Django's lookup
  classes, so a bad value raises at ``filter()`` time as in Django;
- ``order_by(*names)`` with plain field names (``"name"``, ``"-name"``,
  ``"pk"``) Django accepted before;
- ``select_related(*names)``;
- slicing with ``int`` (or omitted) bounds and no step.

The recorded calls (a ``_Chain``) sit in the queryset's
``_deferred_filter``, the slot Django itself uses to defer a filter
(related managers do). The first read of ``.query`` (chaining any other
method, sync iteration, ``len()``, ``repr()`` ...) applies them with
Django's own methods, in call order, on a clone of the pristine query: the
queryset is then exactly the one Django would have built. ``async for``,
``aget()``, ``afirst()``, ``aexists()`` and ``acount()`` on a recorded
queryset run the compiled SQL of their shape instead
(:mod:`django_async_db._fastpath`).
"""

from __future__ import annotations

from asyncio import _get_running_loop
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from django.db.models.query import QuerySet
from django.db.models.sql import Query
from greenlet import getcurrent

from . import _fastpath as fp
from ._bridge import _BridgeGreenlet
from ._fastpath import _Chain, _Op

__all__ = ["install"]

_MISSING = object()
# _Op(...) and _Chain(...) without the class call: tuple.__new__(_Op, (kind, sig,
# args)) is the same namedtuple, built in half the time (250 -> 110 ns).
_new = tuple.__new__


def _chain_to_extend(qs: QuerySet[Any]) -> _Chain | None:
    """Return the recorded calls a new call extends (None: Django's path).

    A recorded queryset, unevaluated, in async code: its chain. A pristine
    queryset in async code whose alias uses the cache: an empty chain.
    """
    # in_bridge() inlined: this runs once per recorded call.
    if _get_running_loop() is None or type(getcurrent()) is _BridgeGreenlet:
        return None
    chain = qs._deferred_filter  # type: ignore[attr-defined]
    if type(chain) is _Chain:
        return chain if qs._result_cache is None else None  # type: ignore[attr-defined]
    if (
        chain is None
        and qs._result_cache is None  # type: ignore[attr-defined]  # slicing reads it
        and getattr(qs, "_cloning_enabled", True)
        and fp._is_pristine(qs)
        and fp._alias_allowed(qs.db)
    ):
        return fp._NO_CHAIN
    return None


def _sliced(chain: _Chain) -> bool:
    # A loop, not any() over a generator: chains are short, the generator costs more.
    for op in chain:  # noqa: SIM110
        if op.kind == "slice":
            return True
    return False


def _record(qs: QuerySet[Any], chain: _Chain, op: _Op) -> QuerySet[Any]:
    """Return a clone of ``qs`` with ``op`` recorded after ``chain`` (what ``_clone()`` copies)."""
    clone: Any = object.__new__(type(qs))
    state = qs.__dict__.copy()
    if not chain:
        # The recorded querysets of one chain share this pristine query: none
        # changes it; applying a chain starts from a clone of it.
        # Query(model): what the pristine query's chain() gives once cloned,
        # for a quarter of the cost (its model's, as _is_pristine() checked).
        state["_query"] = Query(qs.model)
    state["_hints"] = qs._hints or {}  # type: ignore[attr-defined]
    state["_deferred_filter"] = _new(_Chain, (*chain, op))
    clone.__dict__ = state
    return clone  # type: ignore[no-any-return]


def _apply(qs: QuerySet[Any], chain: _Chain) -> None:
    """Apply the recorded calls to ``qs`` with Django's methods, in call order."""
    qs._deferred_filter = None  # type: ignore[attr-defined]
    built = qs._clone()  # type: ignore[attr-defined]
    for op in chain:
        if op.kind == "filter":
            built = fp._stock_filter(built, **op.args)
        elif op.kind == "order_by":
            built = fp._stock_order_by(built, *op.args)
        elif op.kind == "select_related":
            built = fp._stock_select_related(built, *op.args)
        else:
            built = fp._stock_getitem(built, slice(*op.args))
    qs._query = built._query  # type: ignore[attr-defined]


def query(self: QuerySet[Any]) -> Any:
    """Django's ``QuerySet.query``; recorded calls are applied first."""
    chain = self._deferred_filter  # type: ignore[attr-defined]
    if type(chain) is _Chain:
        _apply(self, chain)
    return _stock_query.fget(self)  # type: ignore[misc]


def _learn_filter(model: Any, kwargs: dict[str, Any]) -> Any:
    """Return the lookups Django builds for ``filter(**kwargs)`` (None: not recordable).

    Raises what Django's ``filter()`` raises for these values.
    """
    filtered = fp._stock_filter(QuerySet(model), **kwargs)
    mapped = fp._where_lookups(filtered.query, model, [kwargs])
    if mapped is None:
        return None
    children, order = mapped
    return [(type(c), c.lhs) for c in children], order


def filter(self: QuerySet[Any], *args: Any, **kwargs: Any) -> QuerySet[Any]:
    """Django's ``QuerySet.filter()``; recorded in async code on a pristine queryset."""
    if args or not kwargs or (chain := _chain_to_extend(self)) is None or _sliced(chain):
        return fp._stock_filter(self, *args, **kwargs)  # type: ignore[no-any-return]
    sig = fp._value_sig(kwargs)
    if sig is None:
        return fp._stock_filter(self, **kwargs)  # type: ignore[no-any-return]
    key = ("filter", self.model, sig)
    shape = fp._learnt.get(key, _MISSING)
    if shape is _MISSING:
        try:
            shape = _learn_filter(self.model, kwargs)
        except Exception:  # Django raises it below; the next call tries again
            return fp._stock_filter(self, **kwargs)  # type: ignore[no-any-return]
        fp._learnt[key] = shape
    if shape is None:
        return fp._stock_filter(self, **kwargs)  # type: ignore[no-any-return]
    values = tuple(kwargs.values())
    lookups, order = shape
    built: list[Any] = [None] * len(values)
    # Not strict: both come from one learnt shape, their lengths are equal.
    for (lookup_class, lhs), position in zip(lookups, order, strict=False):
        # Django's value checks and conversions, as its filter() does them; a
        # hit compiles this lookup, as Django's path would.
        built[position] = lookup_class(lhs, values[position])
    return _record(self, chain, _new(_Op, ("filter", sig, kwargs, tuple(built))))


def _plain_ordering(name: Any) -> bool:
    if type(name) is not str:
        return False
    name = name.removeprefix("-")
    return name.isidentifier() and "__" not in name


def order_by(self: QuerySet[Any], *field_names: Any) -> QuerySet[Any]:
    """Django's ``QuerySet.order_by()``; recorded on a recorded or pristine queryset."""
    chain = _chain_to_extend(self)
    if chain is None or _sliced(chain) or not all(map(_plain_ordering, field_names)):
        return fp._stock_order_by(self, *field_names)  # type: ignore[no-any-return]
    key = ("order_by", self.model, field_names)
    if key not in fp._learnt:
        try:
            fp._stock_order_by(QuerySet(self.model), *field_names)  # Django's name checks
        except Exception:
            return fp._stock_order_by(self, *field_names)  # type: ignore[no-any-return]
        fp._learnt[key] = True
    return _record(self, chain, _new(_Op, ("order_by", key[::2], field_names, ())))


def select_related(self: QuerySet[Any], *fields: Any) -> QuerySet[Any]:
    """Django's ``QuerySet.select_related()``; recorded with field names.

    Django checks the names when it compiles the query, so a recorded call
    raises the same error at the same time.
    """
    chain = _chain_to_extend(self)
    if chain is None or not fields or not all(type(f) is str for f in fields):
        return fp._stock_select_related(self, *fields)  # type: ignore[no-any-return]
    return _record(
        self, chain, _new(_Op, ("select_related", ("select_related", fields), fields, ()))
    )


def __getitem__(self: QuerySet[Any], k: Any) -> Any:
    """Django's ``QuerySet.__getitem__()``; a slice with int bounds is recorded."""
    if type(k) is slice and k.step is None:
        start, stop = k.start, k.stop
        if (
            (start is None or (type(start) is int and start >= 0))
            and (stop is None or (type(stop) is int and stop >= 0))
            and (chain := _chain_to_extend(self)) is not None
        ):
            return _record(
                self, chain, _new(_Op, ("slice", ("slice", start, stop), (start, stop), ()))
            )
    return fp._stock_getitem(self, k)


async def _iterate_cached(qs: QuerySet[Any], chain: _Chain) -> AsyncIterator[Any]:
    if qs._result_cache is None:  # type: ignore[attr-defined]
        done, result = await fp._run_cached(qs, "iter", chain, {})
        if not done:
            async for obj in _stock_aiter(qs):
                yield obj
            return
        if qs._result_cache is None:  # type: ignore[attr-defined]
            qs._result_cache = result  # type: ignore[attr-defined]
    for obj in qs._result_cache:  # type: ignore[attr-defined]
        yield obj


def __aiter__(self: QuerySet[Any]) -> AsyncIterator[Any]:
    """Django's ``QuerySet.__aiter__()``; a recorded queryset runs its cached SQL.

    As in Django, the results fill ``_result_cache``: the queryset is evaluated.
    """
    chain = self._deferred_filter  # type: ignore[attr-defined]
    if type(chain) is _Chain and self._result_cache is None and fp._is_recorded(self):  # type: ignore[attr-defined]
        return _iterate_cached(self, chain)
    return _stock_aiter(self)  # type: ignore[no-any-return]


def _terminal(name: str) -> Callable[[QuerySet[Any]], Coroutine[Any, Any, Any]]:
    """Make Django's ``QuerySet.a<name>()``, from the cache on a recorded queryset."""

    async def terminal(self: QuerySet[Any]) -> Any:
        chain = self._deferred_filter  # type: ignore[attr-defined]
        if type(chain) is _Chain and self._result_cache is None and fp._is_recorded(self):  # type: ignore[attr-defined]
            done, result = await fp._run_cached(self, name, chain, {})
            if done:
                return result
        return await _stock_terminals[name](self)

    terminal.__name__ = f"a{name}"
    terminal.__doc__ = f"Django's ``QuerySet.a{name}()``, from the cache on a recorded queryset."
    return terminal


afirst = _terminal("first")
aexists = _terminal("exists")
acount = _terminal("count")

_stock_query: property = QuerySet.query  # type: ignore[assignment]
_stock_aiter: Callable[..., Any] = QuerySet.__aiter__
# Django's afirst/aexists/acount by terminal name ("first", ...), kept by install().
_stock_terminals: dict[str, Callable[..., Any]] = {}


def install() -> None:
    """Patch ``QuerySet`` with the recording calls and their cached terminals."""
    global _stock_query, _stock_aiter
    _stock_query = QuerySet.query  # type: ignore[assignment]
    _stock_aiter = QuerySet.__aiter__
    _stock_terminals.update(first=QuerySet.afirst, exists=QuerySet.aexists, count=QuerySet.acount)
    for name, function in (
        ("afirst", afirst),
        ("aexists", aexists),
        ("acount", acount),
        ("filter", filter),
        ("order_by", order_by),
        ("select_related", select_related),
        ("__getitem__", __getitem__),
        ("__aiter__", __aiter__),
    ):
        function.__qualname__ = f"QuerySet.{name}"
        setattr(QuerySet, name, function)
    query.__qualname__ = "QuerySet.query"
    QuerySet.query = property(query, _stock_query.fset)  # type: ignore[assignment,method-assign]
