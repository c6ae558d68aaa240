"""Make Django's own async ORM API run on the loop through the bridge.

Django implements ``aget()``, ``asave()``, ``async for``, related managers'
``aadd()`` ... as ``sync_to_async(<sync method>)``, looked up as a module
global. :func:`install` re-points those globals at :func:`bridged_sync_to_async`,
which runs the sync method with :func:`~django_async_db.run_sync` (same task,
same connection and transaction, no thread) when the database alias involved
uses this package's ENGINE, and keeps asgiref's thread hop otherwise.

``async_to_sync(fn)(...)`` called inside a bridge (the dispatcher's ``send()``
reaching async receivers, a Channels ``group_send`` in a ``post_save``
receiver ...) would get asgiref's "You cannot use AsyncToSync in the same
thread as an async event loop": inside a bridge, ``AsyncToSync.__call__``
awaits ``fn(...)`` in the calling task instead (same connection and
transaction), and keeps asgiref's behaviour everywhere else. Inside an atomic
block on this ENGINE, async receivers run one after another in the sending
task, so they share its transaction.

Streaming: ``aiterator()`` reads through a server-side cursor, one bridge call
per chunk, like ``iterator()``. Django's version never closes that cursor when
the loop stops early; here the cursor is closed on the loop whenever the
iteration ends: exhausted, ``aclose()``-d (``contextlib.aclosing``), failed,
or abandoned (``break``: the event loop's async-generator finalizer closes it
soon after).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from itertools import islice
from typing import Any

import psycopg
from asgiref import sync as asgiref_sync
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router

from ._bridge import await_only, in_bridge, run_sync, run_sync_shielded

__all__ = ["bridged_sync_to_async", "install", "uses_bridge"]

ENGINE = "django_async_db.backends.postgresql"

logger = logging.getLogger("django_async_db")

# Modules whose ``sync_to_async`` global wraps database work.
_SYNC_TO_ASYNC_MODULES = (
    "django.db.models.query",
    "django.db.models.base",
    "django.db.models.fields.related_descriptors",
    "django.contrib.contenttypes.fields",
    "django.contrib.sessions.backends.base",
    "django.contrib.sessions.backends.db",
    "django.contrib.auth.backends",
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


def _bridging_sync_to_async(
    should_bridge: Callable[[Callable[..., Any], tuple[Any, ...]], bool], name: str
) -> Callable[..., Any]:
    """Make a drop-in for asgiref's ``sync_to_async`` that bridges when ``should_bridge``.

    ``thread_sensitive=False`` (CPU work such as password hashing) and an
    explicit executor keep asgiref's thread hop.
    """

    def sync_to_async(
        func: Callable[..., Any] | None = None,
        *,
        thread_sensitive: bool = True,
        executor: Any = None,
        context: Any = None,
    ) -> Any:
        if func is None:
            return functools.partial(
                sync_to_async,
                thread_sensitive=thread_sensitive,
                executor=executor,
                context=context,
            )
        if not thread_sensitive or executor is not None:
            return asgiref_sync.sync_to_async(
                func, thread_sensitive=thread_sensitive, executor=executor, context=context
            )

        # Django calls sync_to_async(method)(...) on every a* call: build nothing
        # up front (no SyncToAsync, no functools.wraps) on the bridged path.
        async def inner(*args: Any, **kwargs: Any) -> Any:
            if should_bridge(func, args):
                return await run_sync(func, *args, **kwargs)
            return await asgiref_sync.sync_to_async(func, context=context)(*args, **kwargs)

        inner.__wrapped__ = func  # type: ignore[attr-defined]
        return inner

    sync_to_async.__name__ = sync_to_async.__qualname__ = name
    return sync_to_async


#: ``sync_to_async`` for Django's ORM modules: bridged when the alias involved
#: uses this ENGINE (:func:`uses_bridge`), asgiref's thread hop otherwise.
bridged_sync_to_async = _bridging_sync_to_async(uses_bridge, "bridged_sync_to_async")


def _dispatcher_bridges(func: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """Decide for ``Signal.asend()``'s sync receivers (its ``sync_send`` closure).

    They run in the sending task through the bridge (so ``alogin()``'s
    ``update_last_login`` is a native query), except the request lifecycle
    signals outside a transaction: Django's ASGI handler relies on
    ``request_started``/``request_finished`` receivers running in its
    thread-sensitive worker, in order with the request's sync code.
    """
    return _signal_of(func) not in _request_lifecycle_signals() or _in_our_atomic_block()


_sync_to_async_in_transactions = _bridging_sync_to_async(
    _dispatcher_bridges, "_sync_to_async_in_transactions"
)


def _signal_of(func: Callable[..., Any]) -> Any:
    """Return the Signal a dispatcher closure (``asend``'s ``sync_send``) belongs to."""
    code = getattr(func, "__code__", None)
    closure = getattr(func, "__closure__", None)
    if code is None or not closure or "self" not in code.co_freevars:
        return None
    return closure[code.co_freevars.index("self")].cell_contents


@functools.cache
def _request_lifecycle_signals() -> tuple[Any, ...]:
    from django.core import signals

    return (signals.request_started, signals.request_finished)


def _bridge_aware_call(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``AsyncToSync.__call__``: inside a bridge, await the coroutine in this task."""

    @functools.wraps(original)
    def __call__(self: asgiref_sync.AsyncToSync[Any, Any], *args: Any, **kwargs: Any) -> Any:
        if in_bridge():
            return await_only(self.awaitable(*args, **kwargs))
        return original(self, *args, **kwargs)

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    return __call__


def _in_our_atomic_block() -> bool:
    from .backends.postgresql.base import DatabaseWrapper

    storage = connections._connections  # type: ignore[attr-defined]
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


class _Read:
    """One streamed read: Django's sync results generator and the server-side cursor it opens."""

    __slots__ = ("cursor", "iterable", "owner", "prefetch", "rows", "size", "started", "wrapper")

    def __init__(self, iterable: Any, prefetch: tuple[Any, ...]) -> None:
        self.owner = asyncio.current_task()
        self.wrapper = connections[iterable.queryset.db]  # the reading task's connection
        self.iterable = iterable
        self.size: int = iterable.chunk_size
        self.prefetch = prefetch
        self.rows: Iterator[Any] = iter(())
        self.cursor: Any = None
        self.started = False

    def next_chunk(self) -> list[Any]:
        """Return the next ``size`` results with their prefetches done (sync, in the bridge)."""
        from django.db.models import prefetch_related_objects

        if self.started:
            chunk = list(islice(self.rows, self.size))
        else:
            self.started = True
            with self.wrapper.execute_wrapper(self._capture_cursor):
                # Some iterables run the query in __iter__ itself (values_list()).
                self.rows = iter(self.iterable)
                chunk = list(islice(self.rows, self.size))
        if self.prefetch and chunk:
            prefetch_related_objects(chunk, *self.prefetch)
        return chunk

    def _capture_cursor(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        cursor = context["cursor"]
        if self.cursor is None and getattr(cursor.cursor, "name", None):
            self.cursor = cursor  # the named (server-side) cursor DECLAREd for this read
        return execute(sql, params, many, context)

    async def close(self) -> None:
        """Close the server-side cursor on the loop, then let go of the results iterator.

        Runs however the read ends: exhausted, ``aclose()``-d, failed or
        cancelled in the reading task, or abandoned (``break``), in the task
        the loop's async-generator finalizer starts. Shielded, so a cancelled
        task still closes its cursor.
        """
        cursor = self.cursor
        if cursor is not None and not cursor.closed:
            try:
                await run_sync_shielded(self._close_cursor, cursor)
            except (DatabaseError, psycopg.Error) as exc:
                # The connection broke: the cursor went with the session.
                logger.warning("Closing server-side cursor %r failed: %s", cursor.name, exc)
        if self.started:
            # Finalizing Django's iterators closes the cursor again, which takes
            # the connection lock: do it in the bridge, where waiting is an await.
            await run_sync_shielded(self._drop_rows)

    def _close_cursor(self, cursor: Any) -> None:
        with cursor.connection.lock:  # wait for the reading task's own I/O on it
            ours = self._connection_still_ours(cursor)
        # No switch to the loop between the check and the CLOSE: the check holds.
        if ours:
            cursor.close()
        else:
            # The reading task has ended: its connection is being (or has been)
            # given back to the pool, and may be another task's by now. No I/O
            # on it; giving a connection back closes its held cursors.
            cursor.cursor._close()  # psycopg's non-blocking half of close()

    def _drop_rows(self) -> None:
        rows, self.rows = self.rows, iter(())
        close = getattr(rows, "close", None)  # a generator, or map()/chain() of one
        if close is not None:
            close()
        del rows  # the last reference: nested generators are finalized here, in the bridge

    def _connection_still_ours(self, cursor: Any) -> bool:
        """Return True if the cursor's connection is still held for the reading task."""
        if self.wrapper.connection is not cursor.connection:
            return False  # given back already
        if self.owner is None or asyncio.current_task() is self.owner or not self.owner.done():
            return True
        # The reading task has ended: its task-owned connection is being given back
        # by another task; a pinned one (test support) stays.
        storage = connections._connections  # type: ignore[attr-defined]
        pinned = getattr(storage, "pinned", None)
        return pinned is not None and pinned(self.wrapper.alias) is self.wrapper


async def _stream(
    make_iterable: Callable[[], Any], prefetch: tuple[Any, ...]
) -> AsyncIterator[Any]:
    """Yield the iterable's results, reading a chunk per bridge call; always close the cursor."""
    read = _Read(make_iterable(), prefetch)
    try:
        while True:
            chunk = await run_sync(read.next_chunk)
            for item in chunk:
                yield item
            if len(chunk) < read.size:
                return
    finally:
        await read.close()


def _bridged_async_generator(self: Any) -> AsyncIterator[Any]:
    """``BaseIterable._async_generator`` that closes its cursor however iteration ends."""
    if uses_bridge(self.__iter__):
        return _stream(lambda: self, ())
    return _stock_async_generator(self)


def _chunked_iterable(queryset: Any, chunk_size: int) -> Any:
    """Return the iterable Django's ``aiterator()`` reads (same checks, same cursor choice)."""
    if chunk_size <= 0:
        raise ValueError("Chunk size must be strictly positive.")
    use_chunked_fetch = not connections[queryset.db].settings_dict.get(
        "DISABLE_SERVER_SIDE_CURSORS"
    )
    return queryset._iterable_class(
        queryset, chunked_fetch=use_chunked_fetch, chunk_size=chunk_size
    )


def aiterator(self: Any, chunk_size: int = 2000) -> AsyncIterator[Any]:
    """Stream the results through a server-side cursor, ``chunk_size`` rows per fetch.

    Django's ``QuerySet.aiterator()``, run in the task through the bridge and
    with its cursor closed however the loop ends. ``contextlib.aclosing``
    closes it at a known point::

        async with aclosing(Book.objects.aiterator(chunk_size=500)) as books:
            async for book in books:
                if book.pages > 300:
                    break                     # the cursor is closed here
    """
    if uses_bridge(self):
        return _stream(
            functools.partial(_chunked_iterable, self, chunk_size),
            tuple(self._prefetch_related_lookups),
        )
    return _stock_aiterator(self, chunk_size)


_stock_async_generator: Callable[[Any], AsyncIterator[Any]]
_stock_aiterator: Callable[[Any, int], AsyncIterator[Any]]

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
    # Signal.asend() runs sync receivers (request_started/finished, user code)
    # through asgiref's worker thread; only inside a transaction on this ENGINE
    # must they run in the sending task (to see and join the transaction).
    dispatcher_module = importlib.import_module("django.dispatch.dispatcher")
    if getattr(dispatcher_module, "sync_to_async", None) is asgiref_sync.sync_to_async:
        dispatcher_module.sync_to_async = _sync_to_async_in_transactions  # type: ignore[attr-defined]
    asgiref_sync.AsyncToSync.__call__ = _bridge_aware_call(  # type: ignore[method-assign]
        asgiref_sync.AsyncToSync.__call__
    )
    global _stock_async_generator, _stock_aiterator
    query = importlib.import_module("django.db.models.query")
    _stock_async_generator = query.BaseIterable._async_generator
    _stock_aiterator = query.QuerySet.aiterator
    query.BaseIterable._async_generator = _bridged_async_generator
    aiterator.__qualname__ = "QuerySet.aiterator"
    query.QuerySet.aiterator = aiterator
    dispatcher = importlib.import_module("django.dispatch.dispatcher")
    if hasattr(dispatcher, "_run_parallel"):
        dispatcher._run_parallel = _in_task_when_atomic(dispatcher._run_parallel)  # type: ignore[attr-defined]
    else:
        dispatcher.asyncio = _SequentialGatherAsyncio("asyncio")  # type: ignore[attr-defined]
    setting_changed.connect(_forget_aliases, dispatch_uid="django_async_db._orm")
    from . import _fastpath

    _fastpath.install()  # reuse compiled SQL for repeated aget() shapes
    from . import _fastwrite

    _fastwrite.install()  # ... and for repeated acreate()/asave()/aupdate() shapes
    # aauthenticate() runs ModelBackend.authenticate() in the bridge: keep the
    # password hashing it does (hundreds of ms of CPU) off the event loop.
    if apps.is_installed("django.contrib.auth"):
        base_user = importlib.import_module("django.contrib.auth.base_user")
        base_user.check_password = _check_password  # type: ignore[attr-defined]
        base_user.make_password = _offloaded(base_user.make_password)  # type: ignore[attr-defined]
