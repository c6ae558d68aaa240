"""Turn the rows of a cached query shape into model instances, as Django does.

The compiled SQL cache (:mod:`django_async_db._fastpath`) runs SQL that Django
compiled once; this module replaces the other half of Django's read path:
``ModelIterable`` for the queried model and ``RelatedPopulator`` for each
``select_related()`` model (nested ones included). A :class:`Plan` is built
from the compiler's ``klass_info`` when the shape is compiled; on every hit
:func:`rows_to_objects` applies the column converters as
``SQLCompiler.apply_converters`` does and builds each instance:

- directly (``object.__new__`` and the instance ``__dict__``, the same
  attributes and ``_state`` as ``Model.from_db`` gives) when the model has
  Django's own ``__init__``, ``__new__``, ``__setattr__`` and ``from_db``,
  plain field descriptors and no ``pre_init``/``post_init`` receivers;
- with ``Model.from_db`` otherwise, so overrides and receivers run.

Related objects are linked with the compiler's own ``local_setter`` and
``remote_setter``; a related row whose primary key is NULL gives ``None``;
on Django 6.1 each object gets the queryset's fetch mode and, when the mode
tracks peers, one peers list per model per query, as Django builds them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import FunctionType
from typing import Any

from django.db import connections
from django.db.models import Model, signals
from django.db.models.base import ModelState
from django.db.models.fields.mixins import FieldCacheMixin
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute

try:  # Django >= 6.1: fetch modes, from_db(..., fetch_mode=)
    from django.db.models.query import _get_from_db  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Django < 6.1
    _get_from_db = None

__all__ = ["Plan", "build_plan", "direct_construction", "rows_to_objects"]


class Plan:
    """How one model's columns of a row become an instance (``RelatedPopulator``'s data)."""

    __slots__ = (
        "attnames",
        "direct",
        "end",
        "factory",
        "fk_positions",
        "fused",
        "local_setter",
        "model",
        "pk_idx",
        "pk_pos",
        "related",
        "remote_setter",
        "start",
    )

    def __init__(
        self,
        model: type[Model],
        start: int,
        attnames: tuple[str, ...],
        related: tuple[Plan, ...],
        local_setter: Callable[[Any, Any], None] | None,
        remote_setter: Callable[[Any, Any], None] | None,
    ) -> None:
        self.model = model
        self.start = start
        self.end = start + len(attnames)
        self.attnames = attnames
        self.related = related
        self.local_setter = local_setter
        self.remote_setter = remote_setter
        self.pk_idx = attnames.index(model._meta.pk.attname)  # type: ignore[union-attr]
        self.pk_pos = start + self.pk_idx
        self.direct = direct_construction(model, attnames)
        self.fk_positions = tuple(
            i
            for i, name in enumerate(attnames)
            if type(getattr(model, name, None)) is ForeignKeyDeferredAttribute
        )
        self.factory = _direct_factory(self) if self.direct else None
        self.fused = _fused_factory(self)

    def all_direct(self) -> bool:
        """Return True if this model and every related one are built without ``from_db()``."""
        return self.direct and all(plan.all_direct() for plan in self.related)


def build_plan(klass_info: dict[str, Any], select: list[Any]) -> Plan | None:
    """Return the plan of a compiler's ``klass_info`` (and its related ones), or None.

    None when Django would do something the plan does not replicate: a model
    reached through a parent link (multi-table inheritance reorders the
    columns), or a model whose columns are not all its concrete fields in
    order (``only()``/``defer()``).
    """
    if klass_info.get("from_parent"):
        return None
    fields = list(klass_info["select_fields"])
    if not fields or fields != list(range(fields[0], fields[-1] + 1)):
        return None
    model = klass_info["model"]
    start = fields[0]
    attnames = tuple(s[0].target.attname for s in select[start : fields[-1] + 1])
    if list(attnames) != [f.attname for f in model._meta.concrete_fields]:
        return None
    related = []
    for info in klass_info.get("related_klass_infos", ()):
        plan = build_plan(info, select)
        if plan is None:
            return None
        related.append(plan)
    return Plan(
        model,
        start,
        attnames,
        tuple(related),
        klass_info.get("local_setter"),
        klass_info.get("remote_setter"),
    )


def direct_construction(model: type[Model], attnames: tuple[str, ...]) -> bool:
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


def has_init_receivers(model: type[Model]) -> bool:
    """Return True if ``pre_init`` or ``post_init`` has a receiver for ``model``."""
    return bool(
        (signals.pre_init.receivers and signals.pre_init.has_listeners(model))
        or (signals.post_init.receivers and signals.post_init.has_listeners(model))
    )


# A Plan's factory: (model, alias, fetch_mode, object.__new__, ModelState) -> make(row).
_Factory = Callable[[type[Model], str, Any, Any, type[ModelState]], Callable[[Any], Any]]
# A Plan's fused factory takes the related plans' models after those.
_FusedFactory = Callable[..., Callable[[Any], Any]]


# The code of the remote_setter Django gives a non-unique foreign key: lambda x, y: None.
_NOOP = (lambda x, y: None).__code__


def _is_noop(setter: Any) -> bool:
    """Return True if ``setter`` is a two-argument function that only returns None."""
    if type(setter) is not FunctionType or setter.__closure__ is not None:
        return False
    code = setter.__code__
    return (
        code.co_argcount == _NOOP.co_argcount
        and code.co_code == _NOOP.co_code
        and code.co_consts == _NOOP.co_consts
        and code.co_names == _NOOP.co_names
    )


def _cache_name(setter: Any) -> str | None:
    """Return the ``fields_cache`` key ``setter`` writes, if it is Django's own.

    That is a field's (or relation's) ``set_cached_value()`` bound method,
    not overridden: ``instance._state.fields_cache[self.cache_name] = value``.
    """
    if getattr(setter, "__func__", None) is not FieldCacheMixin.set_cached_value:
        return None
    name = setter.__self__.cache_name
    return name if type(name) is str else None


def _instance_lines(obj: str, state: str, model: str, plan: Plan, cache: str | None) -> list[str]:
    """Return the lines building ``plan``'s instance into ``obj``, as ``Model.from_db()``.

    ``_state`` gets its keys in Django's order. With ``cache``, that variable
    holds the instance's ``fields_cache`` when ``Model.__init__`` created it
    (a foreign key with a value: its descriptor looks the cache up), else None.
    """
    values = [f"row[{plan.start + i}]" for i in range(len(plan.attnames))]
    items = ", ".join(
        f"{name!r}: {value}" for name, value in zip(plan.attnames, values, strict=True)
    )
    fk_set = " or ".join(f"{values[i]} is not None" for i in plan.fk_positions)
    # Model.__init__ does ModelState(): cheaper than new(ModelState) (no __new__ wrapper).
    lines = [f"{obj} = new({model})", f"{state} = ModelState()"]
    if cache is None:
        if fk_set:
            lines += [f"if {fk_set}:", f"    {state}.fields_cache = {{}}"]
    elif fk_set:
        lines += [
            f"if {fk_set}:",
            f"    {state}.fields_cache = {cache} = {{}}",
            "else:",
            f"    {cache} = None",
        ]
    else:
        lines.append(f"{cache} = None")
    return [
        *lines,
        f"{state}.adding = False",
        f"{state}.db = alias",
        "if fetch_mode is not None:",
        f"    {state}.fetch_mode = fetch_mode",
        f"{obj}.__dict__ = {{'_state': {state}, {items}}}",
    ]


def _compile_factory(name: str, params: list[str], body: list[str]) -> Any:
    """Compile ``def factory(params): def make(row): body; return make``."""
    args = ", ".join(["model", "alias", "fetch_mode", "new", "ModelState", *params])
    source = "\n".join(
        [
            f"def factory({args}):",
            "    def make(row):",
            *(f"        {line}" for line in body),
            "    return make",
        ]
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<make {name}>", "exec"), namespace)
    return namespace["factory"]


def _direct_factory(plan: Plan) -> _Factory:
    """Compile the factory of the ``make(row)`` functions of a directly built model.

    ``make`` does what ``Model.from_db()`` (``Model.__init__`` with positional
    values) does to the instance and its ``_state``, keys in the same order,
    with the row's values read by constant index and the instance dict built
    by one dict display: per row, a loop, ``zip()`` and ``dict.update()`` cost
    more than the instance itself (``rows_to_objects()``, 20 rows of 4 columns:
    28.8 -> 16.5 us).
    """
    body = [*_instance_lines("obj", "state", "model", plan, None), "return obj"]
    return _compile_factory("/".join(plan.attnames), [], body)  # type: ignore[no-any-return]


def _fused_factory(plan: Plan) -> _FusedFactory | None:
    """Compile one ``make(row)`` for a model and its ``select_related()`` models, or None.

    It builds each related instance (None when its primary key is NULL) and
    does what ``RelatedPopulator`` does with Django's own setters: the
    related object goes into the instance's ``fields_cache`` and, for a
    unique relation, the instance into the related one's. Per row, that saves
    a call of each setter and of the related maker (``rows_to_objects()`` of
    W3's 20 books with their authors: 446k -> 377k instructions, with
    ``ModelState()``).

    None unless every related model is built directly, has no related models
    of its own, and both setters are Django's (``set_cached_value()`` or the
    no-op of a non-unique foreign key).
    """
    if not plan.direct or not plan.related:
        return None
    body = _instance_lines("obj", "state", "model", plan, "cache")
    for i, related in enumerate(plan.related):
        local = _cache_name(related.local_setter)
        noop = _is_noop(related.remote_setter)
        remote = None if noop else _cache_name(related.remote_setter)
        if not related.direct or related.related or local is None or (remote is None and not noop):
            return None
        rel, rstate, rcache = f"rel{i}", f"rstate{i}", f"rcache{i}"
        body += [
            f"if row[{related.pk_pos}] is None:",
            f"    {rel} = None",
            "else:",
            *(f"    {line}" for line in _instance_lines(rel, rstate, f"model{i}", related, rcache)),
        ]
        if remote is not None:
            body += [
                f"    if {rcache} is None:",
                f"        {rstate}.fields_cache = {{{remote!r}: obj}}",
                "    else:",
                f"        {rcache}[{remote!r}] = obj",
            ]
        body += [
            "if cache is None:",
            "    state.fields_cache = cache = {}",
            f"cache[{local!r}] = {rel}",
        ]
    body.append("return obj")
    params = [f"model{i}" for i in range(len(plan.related))]
    name = " + ".join("/".join(p.attnames) for p in (plan, *plan.related))
    return _compile_factory(name, params, body)  # type: ignore[no-any-return]


def _maker(plan: Plan, alias: str, fetch_mode: Any) -> Callable[[Any], Any]:
    """Return a function turning a row into the plan's instance, as ``from_db`` does."""
    model = plan.model
    if plan.factory is not None and not has_init_receivers(model):
        return plan.factory(model, alias, fetch_mode, object.__new__, ModelState)
    # Django < 6.1 has no fetch modes (and no _get_from_db).
    from_db = _get_from_db(model, fetch_mode) if _get_from_db is not None else model.from_db
    names = list(plan.attnames)
    start, end = plan.start, plan.end
    return lambda row: from_db(alias, names, row[start:end])


class _Populator:
    """One ``RelatedPopulator`` for one query: its plan, maker and peers list."""

    __slots__ = ("children", "local_setter", "make", "peers", "pk_pos", "remote_setter")

    def __init__(self, plan: Plan, alias: str, fetch_mode: Any, track_peers: bool) -> None:
        self.pk_pos = plan.pk_pos
        self.make = _maker(plan, alias, fetch_mode)
        self.local_setter: Callable[[Any, Any], None] = plan.local_setter  # type: ignore[assignment]
        self.remote_setter: Callable[[Any, Any], None] = plan.remote_setter  # type: ignore[assignment]
        self.peers: list[Any] | None = [] if track_peers else None
        self.children = [_Populator(p, alias, fetch_mode, track_peers) for p in plan.related]

    def populate(self, row: Any, from_obj: Any) -> None:
        """Build the related object of ``row`` (or None) and link it, as Django does."""
        if row[self.pk_pos] is None:
            self.local_setter(from_obj, None)
            return
        obj = self.make(row)
        if self.peers is not None:
            self.peers.append(weakref.ref(obj))
            obj._state.peers = self.peers
        for child in self.children:
            child.populate(row, obj)
        self.local_setter(from_obj, obj)
        self.remote_setter(obj, from_obj)


def rows_to_objects(
    plan: Plan,
    converters: list[tuple[int, tuple[list[Any], Any]]],
    rows: list[Any],
    alias: str,
    fetch_mode: Any,
) -> list[Any]:
    """Turn result rows into instances exactly as ``ModelIterable`` does."""
    if converters:
        connection = connections[alias]
        converted = []
        for row in rows:
            row = list(row)
            for pos, (convs, expression) in converters:
                value = row[pos]
                for converter in convs:
                    value = converter(value, expression, connection)
                row[pos] = value
            converted.append(row)
        rows = converted
    track_peers = fetch_mode is not None and fetch_mode.track_peers
    if (
        plan.fused is not None
        and not track_peers
        and not has_init_receivers(plan.model)
        and not any(has_init_receivers(p.model) for p in plan.related)
    ):
        related = (p.model for p in plan.related)
        make = plan.fused(plan.model, alias, fetch_mode, object.__new__, ModelState, *related)
        return list(map(make, rows))
    make = _maker(plan, alias, fetch_mode)
    if not plan.related:
        objs = list(map(make, rows))
        if track_peers:
            peers: list[Any] = []
            for obj in objs:
                peers.append(weakref.ref(obj))
                obj._state.peers = peers
        return objs
    populators = [_Populator(p, alias, fetch_mode, track_peers) for p in plan.related]
    if not track_peers and not any(p.children for p in populators):
        # One level of select_related(), inlined: populate() per related
        # object per row costs more than building it.
        flat = [(p.pk_pos, p.make, p.local_setter, p.remote_setter) for p in populators]
        objs = []
        for row in rows:
            obj = make(row)
            for pk_pos, make_related, local_setter, remote_setter in flat:
                if row[pk_pos] is None:
                    local_setter(obj, None)
                else:
                    related = make_related(row)
                    local_setter(obj, related)
                    remote_setter(related, obj)
            objs.append(obj)
        return objs
    objs = []
    peers = []
    for row in rows:
        obj = make(row)
        if track_peers:
            peers.append(weakref.ref(obj))
            obj._state.peers = peers
        for populator in populators:
            populator.populate(row, obj)
        objs.append(obj)
    return objs
