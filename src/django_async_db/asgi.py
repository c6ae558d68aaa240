"""An ASGI handler whose request lifecycle makes no thread hop for database reasons.

Django's :class:`~django.core.handlers.asgi.ASGIHandler` spends two thread
hops on every request before any view code runs:

* ``request_started.asend()`` runs the sync receivers (Django's
  ``reset_queries`` and ``close_old_connections``) through ``sync_to_async``;
* ``sync_to_async(response.close)()`` runs the response's closers and
  ``request_finished.send()`` (``close_old_connections`` again) in a thread.

:class:`ASGIHandler` is a subclass of Django's handler that changes those two
steps for the requests it serves:

* Django's own housekeeping receivers (``close_old_connections``,
  ``reset_queries``) run in the bridge, in the request's task: the task's
  connections on this package's ENGINE are health-checked, given back to the
  pool at request end, and their ``queries_log`` cleared, on the loop;
* the response is closed in the bridge too (closers, then ``request_finished``);
* every other sync receiver still runs in the request's thread-sensitive
  thread, as with Django (write it ``async def`` to avoid the hop), and async
  receivers are awaited concurrently, as Django does;
* if the request did use its thread (a sync middleware or view, a sync
  receiver), Django's housekeeping receivers also run there, for the
  connections that thread opened: sync aliases keep Django's behaviour.

Its ``handle()`` follows Django's step by step (``read_body()``,
``create_request()``, ``run_get_response()``, ``send_response()``,
``listen_for_disconnect()`` are Django's and can be overridden as there),
except how the view is raced against a client disconnect: the view and the
response run in the request's task and one listener task cancels it, instead
of an ``asyncio.TaskGroup`` (Django 6.x) or two tasks and ``asyncio.wait()``
(Django 5.2). The outcomes are Django 6.1's: a disconnect cancels the view
(then ``request_finished`` is sent) or the sending of the response (then the
response is closed); an exception of the view or of ``send`` propagates.

Sync hooks of ``MiddlewareMixin`` middleware (``process_request``,
``process_response``, ``process_view``, ...) hop to a thread too; the
``loop_middleware`` argument lists the middleware whose sync hooks may run in
the bridge on the loop instead (their database I/O becomes awaits; anything
else that blocks would block the loop). Example, in ``asgi.py``::

    from django_async_db.asgi import get_asgi_application

    application = get_asgi_application(
        loop_middleware=["django.middleware.common.CommonMiddleware"],
    )
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import sys
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any, TypeVar

import django
from asgiref import sync as asgiref_sync
from django.core import signals as django_signals
from django.core.exceptions import RequestAborted
from django.core.handlers import asgi as django_asgi
from django.dispatch import Signal
from django.urls import set_script_prefix
from django.utils.module_loading import import_string

from ._bridge import await_only, in_bridge, run_sync
from ._orm import _bridging_sync_to_async
from ._storage import task_wrappers

__all__ = ["ASGIHandler", "get_asgi_application"]

T = TypeVar("T")


class _Request:
    """A request this package's handler serves (the value of ``_serving`` while it does)."""

    __slots__ = ("handler", "outer_thread")

    def __init__(self, handler: ASGIHandler) -> None:
        self.handler = handler
        #: Served from inside ``async_to_sync``: its sync thread is the request's thread.
        #: Fixed for the request; asgiref's ``Local`` is slow to ask, so asked once.
        self.outer_thread = getattr(asgiref_sync.AsyncToSync.executors, "current", None) is not None


#: The request this package's handler is serving (None otherwise).
_serving: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "django_async_db_asgi_serving", default=None
)


@functools.cache
def _on_loop_receivers() -> tuple[Callable[..., Any], ...]:
    """Return Django's own request housekeeping receivers, safe to run on the loop.

    ``close_old_connections`` and ``reset_queries`` act on the calling task's
    connections (in the bridge: health check, release, ``queries_log``);
    ``close_caches`` and ``reset_urlconf`` act on context-local state, which
    the request's task shares with its thread; none waits on anything but the
    database.
    """
    from django.core.cache import close_caches
    from django.core.handlers.base import reset_urlconf
    from django.db import close_old_connections, reset_queries

    return (close_old_connections, reset_queries, close_caches, reset_urlconf)


@functools.cache
def _on_loop_ids() -> frozenset[int]:
    # By identity: a receiver may be an unhashable object with its own __eq__.
    return frozenset(id(r) for r in _on_loop_receivers())  # module functions: never freed


def _request_thread_used() -> bool:
    """Return True if this request already ran sync code in a thread-sensitive thread."""
    context = asgiref_sync.SyncToAsync.thread_sensitive_context.get(None)
    if context is None:
        return True  # the loop's shared thread-sensitive thread: clean it as Django does
    if context in asgiref_sync.SyncToAsync.context_to_thread_executor:
        return True
    request = _serving.get()
    # Served from inside async_to_sync: the outer sync thread is the request's thread.
    if request is None:
        return getattr(asgiref_sync.AsyncToSync.executors, "current", None) is not None
    return request.outer_thread


def _call(receivers: list[Any], signal: Signal, sender: Any, named: dict[str, Any]) -> list[Any]:
    return [(r, r(signal=signal, sender=sender, **named)) for r in receivers]


def _call_on_loop(
    receivers: list[Any], signal: Signal, sender: Any, named: dict[str, Any]
) -> list[Any]:
    """Call the housekeeping receivers in the request's task.

    ``close_old_connections`` and ``reset_queries`` act on initialized
    connections only: with none (a server's new task, at ``request_started``)
    they are not called. At ``request_finished`` the task is about to end:
    ``close_old_connections`` still drops a task-owned connection that is
    unusable (Django's checks), but leaves a healthy one to the end of the
    task, which parks it for the next request instead of handing it to
    psycopg_pool now.
    """
    from django.db import close_old_connections, connections, reset_queries

    initialized = connections.all(initialized_only=True)
    responses: list[Any] = []
    for r in receivers:
        if (r is close_old_connections or r is reset_queries) and not initialized:
            responses.append((r, None))
        elif r is close_old_connections and signal is django_signals.request_finished:
            for conn in initialized:
                if getattr(conn, "is_async", False):
                    conn.close_if_unusable()  # type: ignore[attr-defined]
                else:
                    conn.close_if_unusable_or_obsolete()
            responses.append((r, None))
        else:
            responses.append((r, r(signal=signal, sender=sender, **named)))
    return responses


async def _gather(receivers: list[Any], signal: Signal, sender: Any, named: dict[str, Any]) -> Any:
    results = await asyncio.gather(*(r(signal=signal, sender=sender, **named) for r in receivers))
    return list(zip(receivers, results, strict=True))


def _dispatch(
    signal: Signal, sender: Any, named: dict[str, Any]
) -> Generator[Awaitable[Any], Any, list[Any]]:
    """Send a request lifecycle signal: the decisions, yielding what must be awaited.

    Django's housekeeping receivers run here, on this task's connections (the
    caller drives this in the bridge when the task holds a connection); other
    sync receivers, and the housekeeping again if the request used its thread,
    run in the request's thread-sensitive thread; async receivers are awaited
    together. :func:`_send` (in the bridge) and :func:`_asend` drive it.
    """
    sync_receivers, async_receivers = signal._live_receivers(sender)
    ids = _on_loop_ids()
    responses = _call_on_loop([r for r in sync_receivers if id(r) in ids], signal, sender, named)
    if _request_thread_used():
        in_thread = sync_receivers
    else:
        in_thread = [r for r in sync_receivers if id(r) not in ids]
    if in_thread:
        responses += yield asgiref_sync.sync_to_async(_call, thread_sensitive=True)(
            in_thread, signal, sender, named
        )
    if async_receivers:
        responses += yield _gather(async_receivers, signal, sender, named)
    return responses


def _send(signal: Signal, sender: Any, named: dict[str, Any]) -> list[Any]:
    """Drive :func:`_dispatch` from sync code in the bridge."""
    gen = _dispatch(signal, sender, named)
    try:
        awaitable = next(gen)
        while True:
            awaitable = gen.send(await_only(awaitable))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _asend(signal: Signal, sender: Any, named: dict[str, Any]) -> list[Any]:
    """Drive :func:`_dispatch` from async code: in the bridge only if the task holds a connection.

    Without one (a server's new task per request, at ``request_started``) the
    housekeeping receivers have nothing to wait for, and a greenlet is saved.
    """
    if any(w.connection is not None for w in task_wrappers().values()):
        return await run_sync(_send, signal, sender, named)
    gen = _dispatch(signal, sender, named)
    try:
        awaitable = next(gen)
        while True:
            awaitable = gen.send(await awaitable)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _start_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start a task on the running loop, running its first step now where Python can (3.12+).

    The disconnect listener's first step calls the server's ``receive()``,
    which waits: running it eagerly saves a pass through the loop's ready queue.
    """
    loop = asyncio.get_running_loop()
    if _EAGER:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
    return loop.create_task(coro)


_EAGER = sys.version_info >= (3, 12)


class _RequestFinished:
    """``request_finished`` as ``response.close()`` sends it for a request this handler serves."""

    __slots__ = ()

    def send(self, sender: Any, **named: Any) -> list[Any]:
        """Send from the bridge (the handler runs ``response.close()`` there), else as Django."""
        if not in_bridge():
            return django_signals.request_finished.send(sender=sender, **named)  # type: ignore[no-any-return]
        return _send(django_signals.request_finished, sender, named)

    def __getattr__(self, name: str) -> Any:
        return getattr(django_signals.request_finished, name)


class _Signals(types.ModuleType):
    """``django.core.signals`` as Django's responses see it (``close()`` sends a signal).

    For a request this package's handler serves, ``request_finished`` is sent
    the way :func:`_send` does; otherwise it is Django's.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(django_signals, name)

    @property
    def request_finished(self) -> Any:
        if _serving.get() is None:
            return django_signals.request_finished
        return _REQUEST_FINISHED


_REQUEST_FINISHED = _RequestFinished()


def _middleware_on_loop(func: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """Decide for a middleware's sync hook: bridge it if its handler allows it."""
    request = _serving.get()
    owner = getattr(func, "__self__", None)
    return (
        request is not None and owner is not None and type(owner) in request.handler.loop_middleware
    )


@functools.cache
def _install() -> None:
    """Re-point the ``signals`` global of Django's responses (once; stock requests unchanged)."""
    proxy = _Signals("django.core.signals")
    importlib.import_module("django.http.response").signals = proxy  # type: ignore[attr-defined]


@functools.cache
def _install_middleware() -> None:
    """Re-point ``sync_to_async`` of Django's middleware adapters (once a handler needs it)."""
    on_loop = _bridging_sync_to_async(_middleware_on_loop, "sync_to_async")
    for name in ("django.utils.deprecation", "django.core.handlers.base"):
        module = importlib.import_module(name)
        if getattr(module, "sync_to_async", None) is asgiref_sync.sync_to_async:
            module.sync_to_async = on_loop  # type: ignore[attr-defined]


class ASGIHandler(django_asgi.ASGIHandler):  # type: ignore[misc]
    """Django's ASGI handler, with the request lifecycle's database work on the loop.

    Example::

        from django_async_db.asgi import ASGIHandler

        application = ASGIHandler(loop_middleware=["django.middleware.common.CommonMiddleware"])

    Call ``django.setup()`` first, or use :func:`get_asgi_application`.
    """

    def __init__(self, loop_middleware: Iterable[str | type] = ()) -> None:
        _install()
        #: Middleware classes whose sync hooks run in the bridge instead of a thread.
        self.loop_middleware: frozenset[type] = frozenset(
            import_string(m) if isinstance(m, str) else m for m in loop_middleware
        )
        if self.loop_middleware:
            _install_middleware()  # before super() adapts the middleware's hooks
        super().__init__()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        token = _serving.set(_Request(self))
        try:
            await super().__call__(scope, receive, send)
        finally:
            _serving.reset(token)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Serve one request as Django's ``handle()`` does, with one helper task instead of a group.

        Django 6.1 serves the view under an ``asyncio.TaskGroup`` next to a
        ``listen_for_disconnect()`` task, and builds an exception class per
        request to leave the group (Django 5.2: the view in a second task and
        ``asyncio.wait()``). Here the view and the response run in the
        request's task, and the listener task cancels it if the client goes
        away: the same outcomes (:meth:`_get_and_send_response`) for about a
        fifth of a no-query request's instructions less.
        """
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        with contextlib.closing(body_file):
            set_script_prefix(django_asgi.get_script_prefix(scope))
            await _asend(django_signals.request_started, type(self), {"scope": scope})
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                assert error_response is not None  # create_request() returns one of the two
                body_file.close()
                await self.send_response(error_response, send)
                await run_sync(error_response.close)
                return
            response = await self._get_and_send_response(request, receive, send)
            if response is None:
                await _asend(django_signals.request_finished, type(self), {})
            else:
                await run_sync(response.close)

    async def _get_and_send_response(self, request: Any, receive: Any, send: Any) -> Any:
        """Run the view and send its response; return it, or None if the view was cancelled.

        Django's outcomes: a client disconnect (``listen_for_disconnect()``
        raising ``RequestAborted``) cancels the view or the sending of its
        response, and is not an error; any other exception of the listener is
        raised once the view is cancelled; an exception of the view or of
        ``send`` propagates, the response left unclosed; a cancellation from
        outside (a server shutting down) propagates.
        """
        task = asyncio.current_task()
        assert task is not None  # an ASGI application runs in a task
        listener = _start_task(self._cancel_on_disconnect(receive, task))
        response = None
        try:
            try:
                response = await self.run_get_response(request)
                await self.send_response(response, send)
            finally:
                listener.cancel()  # no-op if it is done
                reason = None if listener.cancelled() or not listener.done() else listener.result()
                outside = reason is not None and task.uncancel() > 0
        except asyncio.CancelledError:
            if reason is None or outside:
                raise
        if reason is not None and not isinstance(reason, RequestAborted):
            raise reason
        return response

    async def _cancel_on_disconnect(
        self, receive: Any, task: asyncio.Task[Any]
    ) -> BaseException | None:
        """Await ``listen_for_disconnect()``; if it raises, cancel ``task`` and return the error."""
        try:
            await self.listen_for_disconnect(receive)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the request is served: the handler is stopping this task
            task.cancel()
            return exc
        return None


def get_asgi_application(loop_middleware: Iterable[str | type] = ()) -> ASGIHandler:
    """Set up Django and return this package's :class:`ASGIHandler`.

    The drop-in for ``django.core.asgi.get_asgi_application()``; see the
    module's documentation for ``loop_middleware``.
    """
    django.setup(set_prefix=False)
    return ASGIHandler(loop_middleware)
