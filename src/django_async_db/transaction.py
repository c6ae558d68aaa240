"""``async_atomic``: Django's ``atomic()`` for async code, spanning awaits.

It drives Django's own ``Atomic.__enter__``/``__exit__`` through the bridge on
the task's connection, so savepoints, ``durable``, ``get_rollback()`` and
``on_commit`` keep Django's exact semantics and state (``in_atomic_block``,
``savepoint_ids``, ``needs_rollback`` on the wrapper). Commit and rollback are
shielded from cancellation: a cancelled block is rolled back completely
before the cancellation propagates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from django.db import DEFAULT_DB_ALIAS
from django.db.transaction import Atomic

from ._bridge import run_sync, run_sync_shielded
from .connection import get_wrapper

__all__ = ["AsyncAtomic", "async_atomic"]

P = ParamSpec("P")
R = TypeVar("R")


class AsyncAtomic:
    """Async context manager and decorator around Django's ``Atomic``."""

    def __init__(self, using: str | None, savepoint: bool, durable: bool) -> None:
        self.using = using
        self._atomic = Atomic(using, savepoint, durable)

    async def __aenter__(self) -> AsyncAtomic:
        get_wrapper(self.using)  # a clear error for an alias on another ENGINE
        await run_sync(self._atomic.__enter__)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await run_sync_shielded(self._atomic.__exit__, exc_type, exc, tb)

    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"async_atomic decorates async functions; {func!r} is not one. "
                f"Use django.db.transaction.atomic for sync functions."
            )

        @functools.wraps(func)
        async def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            async with self:
                return await func(*args, **kwargs)

        return inner


@overload
def async_atomic(using: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
@overload
def async_atomic(
    using: str | None = None, savepoint: bool = True, durable: bool = False
) -> AsyncAtomic: ...
def async_atomic(using: Any = None, savepoint: bool = True, durable: bool = False) -> Any:
    """Run a block (or an async function) in a transaction, like ``atomic()``.

    Nested blocks are savepoints; ``durable=True`` refuses to nest. Example::

        from django_async_db import async_atomic

        async with async_atomic():
            order = await Order.objects.acreate(total=10)
            async with async_atomic():        # savepoint
                await order.lines.acreate(sku="x")

        @async_atomic
        async def transfer(src, dst, amount): ...
    """
    if callable(using):
        return AsyncAtomic(DEFAULT_DB_ALIAS, savepoint, durable)(using)
    return AsyncAtomic(using, savepoint, durable)
