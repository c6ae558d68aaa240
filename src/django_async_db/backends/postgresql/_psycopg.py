"""psycopg connection classes whose I/O waits become awaits inside a bridge.

Django talks to a :class:`BridgeConnection`, a plain sync ``psycopg.Connection``
with one change: its single I/O wait (``wait()``) switches to the event loop
when it runs inside :func:`~django_async_db.run_sync`, instead of blocking the
thread. psycopg's sync client path does about half the work of its async one,
and Django's cursor classes and adapters apply unchanged.

The async pool (psycopg_pool) manages :class:`PooledAsyncConnection` objects;
each carries one :class:`BridgeConnection` *view* sharing its libpq connection.
The two objects are never used at once: the view while a task holds the
connection, the async object while it sits in the pool (checks, resets).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as e
from psycopg import pq, waiting
from psycopg.adapt import AdaptersMap

from ..._bridge import await_only, in_bridge

if TYPE_CHECKING:
    from psycopg.abc import RV, PQGen

logger = logging.getLogger("django_async_db")

_ACTIVE = pq.TransactionStatus.ACTIVE
_INTERRUPTED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class BridgeLock:
    """psycopg's connection lock, made safe for greenlets sharing one thread.

    A ``threading.Lock`` held by a greenlet suspended in an await would block
    the whole loop thread when another greenlet (another task sharing the
    connection, as tests do) tries to take it. Inside a bridge, a contended
    acquire waits on the loop instead; elsewhere it blocks like a plain lock.
    """

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        if in_bridge():
            loop = asyncio.get_running_loop()
            while not self._lock.acquire(False):
                fut = loop.create_future()
                self._waiters.append(fut)
                try:
                    await_only(fut)
                finally:
                    if not fut.done():
                        fut.cancel()
            return True
        return self._lock.acquire(True, timeout)

    def release(self) -> None:
        self._lock.release()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.get_loop().call_soon_threadsafe(_wake, fut)
                break

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BridgeConnection(psycopg.Connection[Any]):
    """A sync psycopg connection that waits on the event loop inside a bridge."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = BridgeLock()  # type: ignore[assignment]

    def wait(
        self,
        gen: PQGen[RV],
        interval: float = 0.1,
        timeout: float | None = None,
    ) -> RV:
        if in_bridge():
            return await_only(self._await_gen(gen, interval, timeout))
        return super().wait(gen, interval, timeout)

    async def _await_gen(
        self,
        gen: PQGen[RV],
        interval: float,
        timeout: float | None,  # noqa: ASYNC109 - psycopg's wait() arguments
    ) -> RV:
        # psycopg's AsyncConnection.wait(), for a sync connection object: on
        # cancellation, cancel the query on the server and drain the result,
        # so the connection is left usable (INERROR / IDLE, never ACTIVE).
        try:
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=timeout
            )
        except _INTERRUPTED:
            if self.pgconn.transaction_status == _ACTIVE:
                try:
                    await self._acancel(timeout=5.0)
                    await waiting.wait_async(
                        gen, self.pgconn.socket, interval=interval, timeout=5.0
                    )
                except e.QueryCanceled:
                    pass  # as expected
                except BaseException as ex:
                    # Not terminated, or interrupted again: the connection is
                    # in an unknown state and must not be reused.
                    logger.warning(
                        "query cancellation failed (%s): closing connection", type(ex).__name__
                    )
                    self.pgconn.finish()
                    if not isinstance(ex, Exception):
                        raise
            raise

    async def _acancel(self, timeout: float) -> None:  # noqa: ASYNC109 - psycopg's signature
        if not self._should_cancel():
            return
        try:
            await waiting.wait_conn_async(self._cancel_gen(), interval=0.1, timeout=timeout)
        except Exception as ex:  # a failed cancel is logged, not raised
            logger.warning("query cancellation failed: %s", ex)


class PooledAsyncConnection(psycopg.AsyncConnection[Any]):
    """The object psycopg_pool manages; :attr:`view` is what Django uses."""

    _view: BridgeConnection | None = None
    # Settings for the view, filled by the pool's configure callback.
    view_kwargs: dict[str, Any]

    @property
    def view(self) -> BridgeConnection:
        """Return the sync view sharing this libpq connection (made once)."""
        view = self._view
        if view is None:
            kwargs = self.view_kwargs
            view = BridgeConnection(self.pgconn)
            view._autocommit = True
            if (context := kwargs.get("context")) is not None:
                view._adapters = AdaptersMap(context.adapters)
            if (cursor_factory := kwargs.get("cursor_factory")) is not None:
                view.cursor_factory = cursor_factory
            view.prepare_threshold = kwargs.get("prepare_threshold")
            # Marks the view as pool-owned: no "deleted while open" warning.
            view._pool = None
            view.pooled = self  # type: ignore[attr-defined]
            self._view = view
        return view
