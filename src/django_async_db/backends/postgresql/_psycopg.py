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
import contextlib
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
_WAIT_R, _WAIT_W = waiting.WAIT_R, waiting.WAIT_W
_READY_R, _READY_W = waiting.READY_R, waiting.READY_W


def _ready(fut: asyncio.Future[int], state: int) -> None:
    if not fut.done():
        fut.set_result(state)


_INTERRUPTED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class BridgeLock:
    """psycopg's connection lock, made safe for greenlets sharing one thread.

    A ``threading.Lock`` held by a greenlet suspended in an await would block
    the whole loop thread when another greenlet (another task sharing the
    connection, as tests do) tries to take it. Inside a bridge, a contended
    acquire waits on the loop instead; elsewhere it blocks like a plain lock.
    Waiters get the lock in order: ``release()`` hands it over, still held, so
    a greenlet that queries back to back cannot starve them.
    """

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._waiters and self._lock.acquire(False):
            return True
        if not blocking:
            return False
        if in_bridge():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await_only(fut)  # resolved by _hand_over(): the lock is ours
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self.release()  # handed over, but interrupted: pass it on
                else:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
            return True
        return self._lock.acquire(True, timeout)

    async def aacquire(self) -> None:
        """Take the lock from plain async code (no bridge): wait on the loop if held."""
        if not self._waiters and self._lock.acquire(False):
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # resolved by _hand_over(): the lock is ours
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over, but interrupted: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.get_loop().call_soon_threadsafe(_hand_over, self, fut)
                return  # still locked: it now belongs to that waiter
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _hand_over(lock: BridgeLock, fut: asyncio.Future[None]) -> None:
    if fut.done():  # the waiter was cancelled meanwhile: next one, or unlock
        lock.release()
    else:
        fut.set_result(None)


class BridgeConnection(psycopg.Connection[Any]):
    """A sync psycopg connection that waits on the event loop inside a bridge."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = BridgeLock()  # type: ignore[assignment]
        #: The compiled SQL cache's cursor for its direct hits, with the time
        #: zone it was made for (django_async_db._fastpath._hit_cursor).
        self.hit_cursor: tuple[psycopg.Cursor[Any], Any] | None = None

    def wait(
        self,
        gen: PQGen[RV],
        interval: float = 0.1,
        timeout: float | None = None,
    ) -> RV:
        if not in_bridge():
            return super().wait(gen, interval, timeout)
        if timeout is not None:
            return await_only(self._await_gen(gen, interval, timeout))
        # The hot path: the loop's fd callbacks resolve a bare future per
        # wait (no timer or task per wait), in one coroutine the driver awaits.
        return await_only(self._await_ready(gen, interval))

    async def _await_ready(self, gen: PQGen[RV], interval: float) -> RV:
        """Step ``gen`` to its end, awaiting each socket wait on the loop.

        An interrupted wait cancels the query on the server and drains it
        (:meth:`_cancel_and_drain`) before the interruption propagates.
        """
        fileno = self.pgconn.socket
        loop = asyncio.get_running_loop()
        try:
            state = next(gen)
            while True:
                fut: asyncio.Future[int] = loop.create_future()
                reader, writer = state & _WAIT_R, state & _WAIT_W
                if reader:
                    loop.add_reader(fileno, _ready, fut, _READY_R)
                if writer:
                    loop.add_writer(fileno, _ready, fut, _READY_W)
                try:
                    ready = await fut
                except _INTERRUPTED:
                    await self._cancel_and_drain(gen, interval)
                    raise
                finally:
                    if reader:
                        loop.remove_reader(fileno)
                    if writer:
                        loop.remove_writer(fileno)
                state = gen.send(ready)
        except StopIteration as ex:
            return ex.value  # type: ignore[no-any-return]
        except OSError as ex:
            raise e.OperationalError("connection socket closed") from ex

    async def aexecute(self, cursor: psycopg.Cursor[Any], query: str, params: Any) -> None:
        """Do ``cursor.execute(query, params)`` from plain async code, without a bridge.

        The same steps as psycopg's ``Cursor.execute()`` (the connection's lock,
        the cursor's own query generator), its waits awaited as :meth:`wait`
        awaits them (:meth:`_await_ready`). For the compiled SQL
        cache's hits: a client-side cursor has its whole result once this returns.
        """
        lock: BridgeLock = self.lock  # type: ignore[assignment]
        await lock.aacquire()
        try:
            await self._await_ready(cursor._execute_gen(query, params), 0.1)
        except e.Error as ex:
            raise ex.with_traceback(None)  # noqa: B904 - as psycopg's execute(): no driver frames
        finally:
            lock.release()

    async def _await_gen(
        self,
        gen: PQGen[RV],
        interval: float,
        timeout: float | None,  # noqa: ASYNC109 - psycopg's wait() arguments
    ) -> RV:
        # psycopg's AsyncConnection.wait(), for a sync connection object.
        try:
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=timeout
            )
        except _INTERRUPTED:
            await self._cancel_and_drain(gen, interval)
            raise

    async def _cancel_and_drain(self, gen: PQGen[Any], interval: float) -> None:
        """After an interrupted wait: cancel the query on the server and drain its result.

        The connection is left usable (INERROR / IDLE, never ACTIVE); if that
        fails it is closed, never reused.
        """
        if self.pgconn.transaction_status != _ACTIVE:
            return
        try:
            await self._acancel(timeout=5.0)
            await waiting.wait_async(gen, self.pgconn.socket, interval=interval, timeout=5.0)
        except e.QueryCanceled:
            pass  # as expected
        except BaseException as ex:
            # Not terminated, or interrupted again: the connection is in an
            # unknown state and must not be reused.
            logger.warning("query cancellation failed (%s): closing connection", type(ex).__name__)
            self.pgconn.finish()
            if not isinstance(ex, Exception):
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
