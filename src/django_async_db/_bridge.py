"""The sync/async boundary: run Django's sync code in a greenlet, await its I/O.

Everything that crosses between the event loop and synchronous Django code
lives in this module (the approach of SQLAlchemy's asyncio extension):

* :func:`run_sync` starts a greenlet that runs ordinary synchronous code (the
  ORM, ``transaction.atomic()``, signal receivers ...) inside the calling task:
  same thread, same contextvars, same task-owned connection.
* :func:`await_only` is how that sync code waits: it switches back to the
  driving coroutine, which awaits the awaitable on the loop and switches back
  in with the result (or throws the exception, ``CancelledError`` included).

No thread is used. Code that is not database I/O still runs on the loop, so
blocking non-database calls inside a bridge block the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

from django.core.exceptions import SynchronousOnlyOperation
from greenlet import GreenletExit, getcurrent, greenlet

__all__ = [
    "SYNC_ONLY_MESSAGE",
    "await_only",
    "in_bridge",
    "install_async_unsafe_hook",
    "run_sync",
]

P = ParamSpec("P")
T = TypeVar("T")

SYNC_ONLY_MESSAGE = (
    "You cannot call this from an async context outside the django-async-db bridge: "
    "it would block the event loop. Run the synchronous code with "
    "`await django_async_db.run_sync(fn)`, use Django's async API "
    "(aget(), asave(), `async for` ...), or load relations up front with "
    "select_related()/prefetch_related() instead of lazy attribute access."
)


class _BridgeGreenlet(greenlet):  # type: ignore[misc]
    """A reusable greenlet running sync calls on behalf of the coroutine in ``driver``.

    It runs :func:`_serve`: one call, then back to the driver with
    :data:`_FINISHED` and the outcome in ``value``/``error``, then waits for
    the next call. Reusing it matters: starting Python code in a new
    greenlet allocates a fresh interpreter data stack (a 16 KiB ``mmap`` on
    CPython 3.11+) and freeing it unmaps it again, two system calls and a page
    fault per call, which cost more than the rest of a bridge call.
    """

    __slots__ = ("driver", "error", "value")

    def __init__(self, driver: greenlet) -> None:
        super().__init__(_serve, driver)
        self.driver = driver
        self.value: Any = None
        self.error: BaseException | None = None


#: What an idle bridge greenlet passes to its driver when its call has ended.
_FINISHED: Any = object()

#: Idle bridge greenlets kept per thread (greenlets belong to their thread).
MAX_IDLE = 128


class _Idle(threading.local):
    def __init__(self) -> None:
        self.free: list[_BridgeGreenlet] = []


_idle = _Idle()


def _serve(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The body of a bridge greenlet: run calls one after another, forever."""
    me = cast(_BridgeGreenlet, getcurrent())
    while True:
        try:
            me.value = fn(*args, **kwargs)
        except GreenletExit:
            raise  # the greenlet is being collected: let it die
        except BaseException as exc:
            me.error = exc
        fn = args = kwargs = None  # type: ignore[assignment]  # hold nothing while idle
        fn, args, kwargs = me.driver.switch(_FINISHED)


def _take(driver: greenlet) -> _BridgeGreenlet:
    """Return an idle bridge greenlet for ``driver``, sharing the driver's contextvars."""
    try:
        glet = _idle.free.pop()
    except IndexError:
        glet = _BridgeGreenlet(driver)
    else:
        if glet.driver is not driver:
            glet.driver = glet.parent = driver
    # The sync code sees the same context (and therefore the same task-owned
    # connections) as the caller.
    glet.gr_context = driver.gr_context
    return glet


def _outcome(glet: _BridgeGreenlet) -> Any:
    """Return the finished call's result (or raise its error); keep ``glet`` for reuse."""
    value, error = glet.value, glet.error
    glet.value = glet.error = None
    glet.gr_context = None  # an idle greenlet keeps no request's context alive
    free = _idle.free
    if len(free) < MAX_IDLE:
        free.append(glet)
    if error is not None:
        # Drop _serve's frame from the traceback: it starts at the caller's code.
        tb = error.__traceback__
        raise error.with_traceback(tb.tb_next if tb is not None else None)
    return value


def in_bridge() -> bool:
    """Return True when called from sync code running inside :func:`run_sync`."""
    return type(getcurrent()) is _BridgeGreenlet


def await_only(awaitable: Awaitable[T]) -> T:
    """Wait for ``awaitable`` on the event loop from sync code inside a bridge.

    The current greenlet is suspended and the driving coroutine awaits the
    awaitable, so the loop keeps running other tasks meanwhile. Exceptions,
    including ``asyncio.CancelledError``, are raised here.
    """
    current = getcurrent()
    if type(current) is not _BridgeGreenlet:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise SynchronousOnlyOperation(
            "await_only() can only be called from code running inside "
            "`await django_async_db.run_sync(...)`."
        )
    return cast(T, current.driver.switch(awaitable))


async def run_sync(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run synchronous Django code with async I/O, in this task, without a thread.

    ``fn`` runs in a greenlet on the event loop thread: every database wait it
    makes becomes an ``await`` on the loop, and it uses this task's own
    connection and transaction. Example::

        from django_async_db import run_sync

        author = await run_sync(lambda: book.author)  # lazy FK access
        n = await run_sync(Book.objects.filter(author=author).count)
    """
    glet = _take(getcurrent())
    depth = _depth.get()
    token = _depth.set(depth + 1)
    try:
        result = glet.switch(fn, args, kwargs)
        while result is not _FINISHED:
            try:
                value = await result
            except BaseException as exc:  # every exception goes back into fn
                result = glet.throw(exc)
            else:
                result = glet.switch(value)
    finally:
        _depth.reset(token)
        if depth == 0 and after_outermost_call is not None:
            await after_outermost_call()
    return cast(T, _outcome(glet))


# How many run_sync() calls of this task are in progress (they nest when a
# bridge awaits async code that bridges again, e.g. signal receivers).
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("django_async_db_depth", default=0)

#: Set by the connection storage when an alias releases idle connections:
#: awaited after each outermost :func:`run_sync` of a task.
after_outermost_call: Callable[[], Awaitable[None]] | None = None


#: Set by the connection storage: ``share_connections(child_task, parent_task)``
#: makes a task created for a shielded await use its parent's connections.
share_connections: Callable[[Any, Any], None] | None = None


async def run_sync_shielded(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` like :func:`run_sync`, but finish it even if the task is cancelled.

    Used for commit/rollback/release: the I/O each step waits for runs shielded
    from cancellation, ``fn`` always runs to completion in this task (same
    connection), and a cancellation received meanwhile is re-raised at the end.
    """
    glet = _take(getcurrent())
    result = glet.switch(fn, args, kwargs)
    cancelled: asyncio.CancelledError | None = None
    while result is not _FINISHED:
        fut = asyncio.ensure_future(result)
        if fut is not result and share_connections is not None:
            # The awaitable runs in a task of its own (so cancelling this task
            # cannot interrupt it); it must keep using this task's connections,
            # e.g. an async on_commit callback run by Atomic.__exit__.
            share_connections(fut, asyncio.current_task())
        while True:
            try:
                value = await asyncio.shield(fut)
            except asyncio.CancelledError as exc:
                if not fut.done():
                    cancelled = exc  # the task was cancelled, not the I/O: keep waiting
                    continue
                result = glet.throw(exc)
            except BaseException as exc:
                result = glet.throw(exc)
            else:
                result = glet.switch(value)
            break
    value = _outcome(glet)  # raises the call's error
    if _depth.get() == 0 and after_outermost_call is not None:
        await after_outermost_call()  # e.g. a commit just made the connection idle
    if cancelled is not None:
        raise cancelled
    return cast(T, value)


def _loop_running() -> bool:
    """Return True when an event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


#: Classes whose ``@async_unsafe`` methods may run inside a bridge (the backend
#: registers its DatabaseWrapper): :func:`install_async_unsafe_hook`.
_bridge_aware: tuple[type, ...] = ()


def _django_get_running_loop() -> asyncio.AbstractEventLoop:
    """``get_running_loop`` as Django's ``@async_unsafe`` checks see it.

    Django calls it from the guard around ``connect()``, ``cursor()``,
    ``commit()``... of a database wrapper. For a bridge-aware wrapper the
    answer depends on where the call comes from: inside a bridge "no loop"
    (the call is allowed: its I/O is async); in plain async code an error that
    names the fix. Other wrappers get the real answer, so Django's own check
    and message apply to them, bridge or not. Without a running loop this is
    just ``asyncio.get_running_loop()``: sync code pays nothing more.
    """
    loop = asyncio.get_running_loop()
    args = sys._getframe(1).f_locals.get("args")  # the guard's (self, ...) arguments
    if not args or not isinstance(args[0], _bridge_aware):
        return loop
    if type(getcurrent()) is _BridgeGreenlet:
        raise RuntimeError("no running event loop")
    if os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"):
        return loop
    raise SynchronousOnlyOperation(SYNC_ONLY_MESSAGE)


def install_async_unsafe_hook(*wrapper_classes: type) -> None:
    """Make Django's ``@async_unsafe`` guards bridge-aware for ``wrapper_classes``.

    The guards stay Django's own (so anything that patches the guarded methods
    later, such as test tools or error trackers, still applies); only the
    ``get_running_loop`` they consult is replaced.
    """
    import django.utils.asyncio

    global _bridge_aware
    _bridge_aware = tuple({*_bridge_aware, *wrapper_classes})
    django.utils.asyncio.get_running_loop = _django_get_running_loop  # type: ignore[attr-defined]
