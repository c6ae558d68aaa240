"""Make Django's own async ORM API run on the loop through the bridge.

Django implements ``aget()``, ``asave()``, ``async for``, related managers'
``aadd()`` ... as ``sync_to_async(<sync method>)``, looked up as a module
global. :func:`install` re-points those globals at :func:`bridged_sync_to_async`,
which runs the sync method with :func:`~django_async_db.run_sync` (same task,
same connection and transaction, no thread) when the database alias involved
uses this package's ENGINE, and keeps asgiref's thread hop otherwise.

Signals: ``send()`` reaches async receivers through ``async_to_sync``, which
cannot work inside a bridge (the loop runs in this thread); the dispatcher's
``async_to_sync`` is re-pointed to await them through the bridge instead, and
inside an atomic block on this ENGINE async receivers run one after another
in the sending task, so they share its transaction.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import types
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from asgiref import sync as asgiref_sync
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections, router

from ._bridge import await_only, in_bridge, run_sync

__all__ = ["bridged_async_to_sync", "bridged_sync_to_async", "install", "uses_bridge"]

ENGINE = "django_async_db.backends.postgresql"

# Modules whose ``sync_to_async`` global wraps database work.
_SYNC_TO_ASYNC_MODULES = (
    "django.db.models.query",
    "django.db.models.base",
    "django.db.models.fields.related_descriptors",
    "django.contrib.contenttypes.fields",
    "django.contrib.sessions.backends.base",
    "django.contrib.sessions.backends.db",
    "django.contrib.auth.backends",
    "django.dispatch.dispatcher",
    "django.core.paginator",
)

_all_ours: bool | None = None


def _every_alias_ours() -> bool:
    global _all_ours
    if _all_ours is None:
        _all_ours = all(s["ENGINE"] == ENGINE for s in connections.settings.values())
    return _all_ours


def _forget_aliases(*, setting: str, **kwargs: Any) -> None:
    global _all_ours
    if setting == "DATABASES":
        _all_ours = None


def _alias_of(obj: Any) -> str | None:
    """Return the database alias ``obj`` (a queryset, manager, model ...) will use."""
    if obj is None:
        return None
    if isinstance(obj, types.MethodType):
        return _alias_of(obj.__self__)
    if isinstance(obj, types.GeneratorType):
        frame = obj.gi_frame
        return _alias_of(frame.f_locals.get("self")) if frame is not None else None
    state = getattr(obj, "_state", None)
    if state is not None and hasattr(obj, "_meta"):  # a model instance
        return state.db or router.db_for_write(type(obj), instance=obj)  # type: ignore[no-any-return]
    queryset = getattr(obj, "queryset", None)  # ORM iterables
    if queryset is not None and hasattr(queryset, "db"):
        return queryset.db  # type: ignore[no-any-return]
    db = getattr(obj, "db", None)  # querysets, managers, related managers
    return db if isinstance(db, str) else None


def uses_bridge(func: Callable[..., Any], args: Iterable[Any] = ()) -> bool:
    """Return True if ``func(*args)`` should run through the bridge."""
    if _every_alias_ours():
        return True
    alias = _alias_of(func)
    if alias is None:
        for arg in args:
            if (alias := _alias_of(arg)) is not None:
                break
        else:
            alias = DEFAULT_DB_ALIAS
    settings = connections.settings.get(alias)
    return settings is not None and settings["ENGINE"] == ENGINE


def bridged_sync_to_async(
    func: Callable[..., Any] | None = None,
    *,
    thread_sensitive: bool = True,
    executor: Any = None,
    context: Any = None,
) -> Any:
    """Drop-in for asgiref's ``sync_to_async`` that bridges database work.

    ``thread_sensitive=False`` (CPU work such as password hashing) and
    callables for aliases on other ENGINEs keep asgiref's thread hop.
    """
    if func is None:
        return functools.partial(
            bridged_sync_to_async,
            thread_sensitive=thread_sensitive,
            executor=executor,
            context=context,
        )
    stock = asgiref_sync.sync_to_async(
        func, thread_sensitive=thread_sensitive, executor=executor, context=context
    )
    if not thread_sensitive or executor is not None:
        return stock

    @functools.wraps(func)
    async def inner(*args: Any, **kwargs: Any) -> Any:
        if uses_bridge(func, args):
            return await run_sync(func, *args, **kwargs)
        return await stock(*args, **kwargs)

    return inner


def bridged_async_to_sync(
    awaitable: Callable[..., Coroutine[Any, Any, Any]], *, force_new_loop: bool = False
) -> Callable[..., Any]:
    """Drop-in for asgiref's ``async_to_sync`` that awaits through the bridge when inside one."""
    stock = asgiref_sync.async_to_sync(awaitable, force_new_loop=force_new_loop)

    @functools.wraps(awaitable)
    def inner(*args: Any, **kwargs: Any) -> Any:
        if in_bridge():
            return await_only(awaitable(*args, **kwargs))
        return stock(*args, **kwargs)

    return inner


def _in_our_atomic_block() -> bool:
    from .backends.postgresql.base import DatabaseWrapper

    storage = connections._connections
    for alias in connections:
        wrapper = getattr(storage, alias, None)
        if isinstance(wrapper, DatabaseWrapper) and wrapper.in_atomic_block:
            return True
    return False


def _offloaded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run CPU-bound ``func`` (password hashing) in a thread when called from a bridge."""

    @functools.wraps(func)
    def inner(*args: Any, **kwargs: Any) -> Any:
        if in_bridge():
            return await_only(asyncio.to_thread(func, *args, **kwargs))
        return func(*args, **kwargs)

    return inner


def _check_password(
    password: str | None,
    encoded: str,
    setter: Callable[[str | None], Any] | None = None,
    preferred: str = "default",
) -> bool:
    """``hashers.check_password`` hashing off the loop, but saving the upgrade in the task."""
    from django.contrib.auth import hashers

    if not in_bridge():
        return hashers.check_password(password, encoded, setter, preferred)
    is_correct, must_update = await_only(
        asyncio.to_thread(hashers.verify_password, password, encoded, preferred=preferred)
    )
    if setter and is_correct and must_update:
        setter(password)
    return is_correct  # type: ignore[no-any-return]


def _in_task_when_atomic(
    run_parallel: Callable[..., Coroutine[Any, Any, list[Any]]],
) -> Callable[..., Coroutine[Any, Any, list[Any]]]:
    """Run async receivers in the sending task while it is inside a transaction."""

    @functools.wraps(run_parallel)
    async def inner(*coros: Any) -> list[Any]:
        if _in_our_atomic_block():
            return [await coro for coro in coros]
        return await run_parallel(*coros)

    return inner


class _SequentialGatherAsyncio(types.ModuleType):
    """``asyncio`` for Django < 6's dispatcher: gather() runs in-task inside transactions."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("asyncio"), name)

    async def gather(self, *aws: Any, return_exceptions: bool = False) -> list[Any]:
        import asyncio

        if _in_our_atomic_block() and all(asyncio.iscoroutine(a) for a in aws):
            return [await a for a in aws]
        return await asyncio.gather(*aws, return_exceptions=return_exceptions)


_installed = False


def install() -> None:
    """Re-point Django's async ORM entry points at the bridge (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    from django.apps import apps

    for name in _SYNC_TO_ASYNC_MODULES:
        if name.startswith("django.contrib.") and not apps.is_installed(
            ".".join(name.split(".")[:3])
        ):
            continue  # importing it would fail: its models are not installed
        module = importlib.import_module(name)
        if getattr(module, "sync_to_async", None) is asgiref_sync.sync_to_async:
            module.sync_to_async = bridged_sync_to_async  # type: ignore[attr-defined]
    dispatcher = importlib.import_module("django.dispatch.dispatcher")
    dispatcher.async_to_sync = bridged_async_to_sync  # type: ignore[attr-defined]
    if hasattr(dispatcher, "_run_parallel"):
        dispatcher._run_parallel = _in_task_when_atomic(dispatcher._run_parallel)
    else:
        dispatcher.asyncio = _SequentialGatherAsyncio("asyncio")  # type: ignore[attr-defined]
    setting_changed.connect(_forget_aliases, dispatch_uid="django_async_db._orm")
    # aauthenticate() runs ModelBackend.authenticate() in the bridge: keep the
    # password hashing it does (hundreds of ms of CPU) off the event loop.
    if apps.is_installed("django.contrib.auth"):
        base_user = importlib.import_module("django.contrib.auth.base_user")
        base_user.check_password = _check_password  # type: ignore[attr-defined]
        base_user.make_password = _offloaded(base_user.make_password)  # type: ignore[attr-defined]
