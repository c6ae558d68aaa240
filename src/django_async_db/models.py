"""Awaitable relation attributes for models: ``await chapter.abook``, ``chapter.acites.aadd(...)``.

Django's lazy relation access (``chapter.book``) runs a query when the related
object is not loaded yet, which async code cannot do without blocking the
loop. :class:`AsyncModelMixin` gives every relation an ``a``-prefixed twin
that async code can use:

* single-valued relations (forward ``ForeignKey`` / ``OneToOneField``, reverse
  one-to-one): ``await obj.a<name>`` returns what ``obj.<name>`` returns
  (``None`` for an empty nullable foreign key, Django's
  ``RelatedObjectDoesNotExist`` for a missing reverse one-to-one). A relation
  that is not loaded yet is loaded through the bridge, in this task, on its
  connection and in its transaction, and cached like the sync attribute
  caches it; a loaded one costs no query and no bridge call.
* many-valued relations (reverse ``ForeignKey``, ``ManyToManyField`` either
  way): ``obj.a<name>`` is the related manager itself, whose ``aadd()``,
  ``aremove()``, ``acreate()``, ``async for`` ... are native.

The twins are class attributes (non-data descriptors) installed on each model
when its first instance is made, once every model is loaded: no
``__getattr__``, so Django's own attribute errors (a missing reverse
one-to-one raises ``RelatedObjectDoesNotExist``, an ``AttributeError``) pass
through unchanged.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from django.db.models import Model

from ._bridge import run_sync

__all__ = ["AsyncModelMixin", "RelatedObjectAwaitable"]

_INSTALLED = "_async_relations_installed"


class RelatedObjectAwaitable:
    """``await`` it for the related object; nothing runs until it is awaited."""

    __slots__ = ("_field", "_instance", "_name")

    def __init__(self, instance: Model, name: str, field: Any) -> None:
        self._instance = instance
        self._name = name
        self._field = field

    def _loaded(self) -> bool:
        """Return True if reading the attribute needs no query."""
        field, instance = self._field, self._instance
        is_cached = getattr(field, "is_cached", None)
        if is_cached is not None and is_cached(instance):
            return True
        # An empty forward foreign key reads as None without a query.
        attname = getattr(field, "attname", None)
        return (
            attname is not None
            and field.concrete
            and attname in instance.__dict__
            and instance.__dict__[attname] is None
        )

    def __await__(self) -> Generator[Any, None, Any]:
        if self._loaded():
            return getattr(self._instance, self._name)
        return (yield from run_sync(getattr, self._instance, self._name).__await__())

    def __repr__(self) -> str:
        return f"<awaitable {type(self._instance).__name__}.{self._name}>"


class _RelatedObjectTwin:
    """``obj.a<name>`` for a single-valued relation: an awaitable of ``obj.<name>``."""

    def __init__(self, name: str, field: Any) -> None:
        self.name = name
        self.field = field

    def __get__(self, instance: Model | None, owner: type[Model]) -> Any:
        if instance is None:
            return self
        return RelatedObjectAwaitable(instance, self.name, self.field)


class _RelatedManagerTwin:
    """``obj.a<name>`` for a many-valued relation: the related manager ``obj.<name>``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: Model | None, owner: type[Model]) -> Any:
        if instance is None:
            return self
        return getattr(instance, self.name)


def install_relation_twins(model: type[Model]) -> bool:
    """Add the ``a<relation>`` attributes to ``model``; return False if models are not loaded yet.

    Names that already exist on the model (``asave``, a field called
    ``abook`` ...) are left alone: real attributes always win.
    """
    if not model._meta.apps.models_ready:
        return False
    for field in model._meta.get_fields():
        if not field.is_relation:
            continue
        if field.auto_created and not field.concrete:  # a reverse relation
            name = field.get_accessor_name()  # type: ignore[union-attr]
            if not name:  # related_name="+": no accessor
                continue
        else:
            name = field.name
        twin = "a" + name
        if hasattr(model, twin):
            continue
        if field.many_to_one or field.one_to_one:
            setattr(model, twin, _RelatedObjectTwin(name, field))
        else:
            setattr(model, twin, _RelatedManagerTwin(name))
    setattr(model, _INSTALLED, True)
    return True


class AsyncModelMixin:
    """Give a model an ``a``-prefixed, async-safe twin of each relation attribute.

    Put it before ``models.Model`` in the bases. Example::

        class Chapter(AsyncModelMixin, models.Model):
            book = models.ForeignKey(Book, null=True, on_delete=models.CASCADE)
            cites = models.ManyToManyField(Book, related_name="cited_in")

        chapter = await Chapter.objects.aget(pk=1)
        book = await chapter.abook              # the Book, or None
        await chapter.acites.aadd(other_book)   # the related manager
        async for cited in chapter.acites.all():
            ...
    """

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = type(self)
        if _INSTALLED not in model.__dict__:
            install_relation_twins(model)  # type: ignore[arg-type]
        super().__init__(*args, **kwargs)
