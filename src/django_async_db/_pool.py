"""One psycopg_pool ``AsyncConnectionPool`` per database alias per event loop.

Django's postgresql backend calls ``self.pool.open()``, ``self.pool.getconn()``
and ``connection._pool.putconn(connection)`` synchronously. :class:`AsyncPool`
offers exactly that interface to Django's own code running inside a bridge,
and awaits the async pool underneath (:func:`~django_async_db._bridge.await_only`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import TYPE_CHECKING, Any

import psycopg_pool
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from psycopg_pool.pool_async import MaintenanceTask, StopWorker

from ._bridge import await_only, run_sync
from .backends.postgresql._psycopg import BridgeConnection, PooledAsyncConnection
from .exceptions import PoolTimeout

if TYPE_CHECKING:
    from .backends.postgresql.base import DatabaseWrapper

__all__ = [
    "AsyncPool",
    "all_pool_stats",
    "close_pools",
    "get_pool",
    "pool_stats",
    "reuse_wrapper",
    "terminate_pools",
]

#: Used when ``OPTIONS["pool"]`` is absent or ``True``.
DEFAULT_POOL_OPTIONS: dict[str, Any] = {"min_size": 1, "max_size": 20, "timeout": 30.0}
# Keys the backend sets itself; a user value would be silently ignored or break it.
_RESERVED = frozenset({"conninfo", "kwargs", "connection_class", "open", "configure"})

#: How long a finished task's wrapper keeps its connection for the next task on
#: the loop before the connection goes back to psycopg_pool (where its
#: max_idle, max_lifetime and shrinking apply again).
PARK_SECONDS = 1.0

logger = logging.getLogger("django_async_db")

# Bumped by any setting change: parked wrappers from before it are not reused
# (their time zone, DEBUG or DATABASES settings may be stale).
_generation = 0


def new_generation(**kwargs: object) -> None:
    """Make every parked or spare wrapper stale (a setting changed)."""
    global _generation
    _generation += 1


setting_changed.connect(new_generation, dispatch_uid="django_async_db._pool")

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncPool]] = (
    weakref.WeakKeyDictionary()
)


def pool_options(alias: str, value: object) -> dict[str, Any] | None:
    """Validate ``OPTIONS["pool"]`` and return psycopg_pool keyword arguments.

    ``None`` means unpooled: each task opens and closes its own connection.
    """
    if value is False:
        return None
    if value is None or value is True:
        return dict(DEFAULT_POOL_OPTIONS)
    if not isinstance(value, dict):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['pool'] must be True, False or a dict of "
            f"psycopg_pool.AsyncConnectionPool arguments, not {value!r}."
        )
    if reserved := sorted(_RESERVED & value.keys()):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['pool'] cannot set {', '.join(reserved)}: "
            f"django-async-db sets these itself."
        )
    options = {**DEFAULT_POOL_OPTIONS, **value}
    if "max_size" not in value and options["min_size"] > options["max_size"]:
        options["max_size"] = options["min_size"]
    return options


class _ConnectionPool(psycopg_pool.AsyncConnectionPool[PooledAsyncConnection]):
    """psycopg_pool's async pool, whose maintenance workers stop when cancelled."""

    @classmethod
    async def worker(cls, q: Any) -> None:
        """Run maintenance jobs until told to stop or cancelled.

        psycopg_pool's jobs catch ``CancelledError`` (connecting, returning a
        connection), so its worker, cancelled mid-job by ``asyncio.run()``
        shutting the loop down, would go back to waiting for jobs and the loop
        would never finish. A cancellation request ends the worker here.
        """
        task = asyncio.current_task()
        while True:
            job: MaintenanceTask = await q.get()
            if isinstance(job, StopWorker):
                return
            try:
                await job.run()
            except (Exception, asyncio.CancelledError) as ex:  # like psycopg_pool's worker
                if not (task is not None and task.cancelling()):
                    logger.warning("Pool maintenance job %s failed: %r", job, ex)
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def _connect(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - psycopg_pool's signature
    ) -> PooledAsyncConnection:
        try:
            return await super()._connect(timeout)
        except asyncio.CancelledError as exc:
            # psycopg_pool logs this exception; its traceback reaches the frame
            # holding the half-open libpq connection, which a handler keeping
            # log records (pytest's, an error tracker's) would leave open.
            # Without the traceback the connection is freed, and closed, now.
            raise exc.with_traceback(None) from None


class AsyncPool:
    """The connections of one alias on one event loop, pooled or not."""

    def __init__(self, wrapper: DatabaseWrapper) -> None:
        self.alias = wrapper.alias
        options = pool_options(self.alias, wrapper.settings_dict["OPTIONS"].get("pool"))
        params = wrapper.get_connection_params()
        # The sync view gets Django's cursor class and prepare setting; the
        # async object the pool manages only connects, checks and resets.
        self._view_kwargs = {
            "context": params.get("context"),
            "cursor_factory": params.pop("cursor_factory", None),
            "prepare_threshold": params.pop("prepare_threshold", None),
        }
        params["autocommit"] = True
        params["prepare_threshold"] = None
        self._params = params
        self._configure_view: Callable[[BridgeConnection], object] = wrapper._configure_connection  # type: ignore[attr-defined]
        self.options = options
        self._pool: _ConnectionPool | None = None
        #: Set once the pool is closed or no longer the loop's pool for the alias.
        self.closed = False
        #: Connections held by tasks right now.
        self.checked_out = 0
        # Finished tasks' wrappers that still hold their (idle) connection, with
        # the loop time they were parked and the settings generation, oldest
        # first: the next task takes the newest one whole. See park().
        self._parked: list[tuple[DatabaseWrapper, float, int]] = []
        # Finished tasks' clean wrappers without a connection, for reuse.
        self._spare: list[tuple[DatabaseWrapper, int]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._loop = wrapper._loop
        self._spare_max = options["max_size"] if options is not None else 0
        #: Checkouts that gave up after ``timeout`` seconds (PoolTimeout raised).
        self.timeouts = 0
        # Every connection this pool made, to close them if the loop closes first.
        self._conns: weakref.WeakSet[PooledAsyncConnection] = weakref.WeakSet()
        if options is not None:
            check = options.pop("check", None)
            if check is None and wrapper.settings_dict.get("CONN_HEALTH_CHECKS"):
                check = psycopg_pool.AsyncConnectionPool.check_connection
            try:
                self._pool = _ConnectionPool(
                    kwargs=params,
                    connection_class=PooledAsyncConnection,
                    open=False,
                    configure=self._configure,
                    check=check,
                    name=f"django_async_db:{self.alias}",
                    **options,
                )
            except (TypeError, ValueError) as exc:
                raise ImproperlyConfigured(
                    f"Invalid DATABASES[{self.alias!r}]['OPTIONS']['pool']: {exc}."
                ) from exc
            self._opened = False
        # Parking skips psycopg_pool's checkout, hence its health check.
        self._can_park = self._pool is not None and self._pool._check is None

    async def _configure(self, conn: PooledAsyncConnection) -> None:
        self._conns.add(conn)
        conn.view_kwargs = self._view_kwargs
        await run_sync(self._configure_view, conn.view)

    async def _connect(self) -> PooledAsyncConnection:
        conn = await PooledAsyncConnection.connect(**self._params)
        await self._configure(conn)
        return conn

    async def aopen(self) -> None:
        """Open the pool (start filling it) unless it is already open."""
        if self._pool is not None and not self._opened:
            self._opened = True
            await self._pool.open()

    async def agetconn(self) -> BridgeConnection:
        """Return the sync view of a connection checked out for the current task."""
        if (parked := self._take_parked()) is not None:
            # A task whose wrapper lost its connection: take a parked one's.
            view: BridgeConnection = parked.connection
            parked.connection = None
            self.spare(parked)
            self.checked_out += 1
            return view
        if self._pool is None:
            conn = await self._connect()
        else:
            await self.aopen()
            task = asyncio.current_task()
            cancels = task.cancelling() if task is not None else 0
            try:
                conn = await self._pool.getconn()
            except psycopg_pool.PoolTimeout as exc:
                self.timeouts += 1
                raise PoolTimeout(
                    self.alias, self._pool.max_size, self._pool.timeout, self.checked_out
                ) from exc
            if task is not None and task.cancelling() > cancels:
                # Cancelled while waiting, but the connection arrived at the same
                # moment and the wait returned it: Python 3.11's wait_for(), used
                # by psycopg_pool, swallows the cancellation then (CPython
                # gh-86296). Honour it: give the connection back and stop.
                await self._pool.putconn(conn)
                raise asyncio.CancelledError
        self.checked_out += 1
        view = conn.view
        view._pool = self  # type: ignore[assignment]  # Django's _close() returns it here
        return view

    async def aputconn(self, view: BridgeConnection) -> None:
        """Give a connection back (or close it when unpooled)."""
        self.checked_out -= 1
        await self._return(view)

    async def _return(self, view: BridgeConnection) -> None:
        conn: PooledAsyncConnection = view.pooled  # type: ignore[attr-defined]
        if self._pool is None or conn._pool is None or self.closed:
            await conn.close()
        else:
            await self._pool.putconn(conn)

    # Reuse across tasks on this loop: a request (an ASGI server's task) that
    # ends with its wrapper clean leaves wrapper and connection to the next
    # one, which skips making a wrapper (~95k instructions), Django's
    # connect() and two trips through psycopg_pool's lock.

    def park(self, wrapper: DatabaseWrapper) -> bool:
        """Keep a finished task's clean wrapper and its idle connection for the next task.

        Not when a task is waiting for a connection in psycopg_pool (it must
        get this one), nor when the pool checks connections on checkout.
        """
        pool = self._pool
        if (
            not self._can_park
            or self.closed
            or pool is None
            or pool._waiting
            or self._worn_out(wrapper.connection)
        ):
            return False
        self._parked.append((wrapper, self._loop.time(), _generation))  # type: ignore[union-attr]
        self.checked_out -= 1
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_later(PARK_SECONDS, self._flush)  # type: ignore[union-attr]
        return True

    def _worn_out(self, view: BridgeConnection) -> bool:
        """Return True if psycopg_pool would discard this connection on its return.

        Past its ``max_lifetime`` or made before a ``drain()``: the test
        psycopg_pool applies when a connection comes back, which a connection
        passed from task to task would otherwise never meet.
        """
        conn: Any = view.pooled  # type: ignore[attr-defined]
        expire_at = getattr(conn, "_expire_at", None)
        if expire_at is None:
            return False
        drained_at = getattr(self._pool, "_drained_at", 0.0)
        return expire_at <= monotonic() or conn._created_at <= drained_at  # type: ignore[no-any-return]

    def spare(self, wrapper: DatabaseWrapper) -> None:
        """Keep a finished task's clean wrapper that holds no connection for reuse."""
        if not self.closed and len(self._spare) < self._spare_max:
            self._spare.append((wrapper, _generation))

    def _take_parked(self) -> DatabaseWrapper | None:
        """Pop the newest parked wrapper still usable; stale ones give their connection back."""
        parked = self._parked
        while parked:
            wrapper, _, generation = parked.pop()
            if (
                generation == _generation
                and not wrapper.connection.closed
                and not self._worn_out(wrapper.connection)
            ):
                return wrapper
            self._give_back([wrapper.connection])
            wrapper.connection = None
        return None

    def reuse_parked(self) -> DatabaseWrapper | None:
        """Return the newest parked (connected) wrapper for a task, or None."""
        wrapper = self._take_parked()
        if wrapper is not None:
            self.checked_out += 1
            wrapper.reuse()
        return wrapper

    def reuse_spare(self) -> DatabaseWrapper | None:
        """Return a spare wrapper (not connected) for a task, or None."""
        spare = self._spare
        while spare:
            wrapper, generation = spare.pop()
            if generation == _generation:
                wrapper.reuse()
                return wrapper
        return None

    def _flush(self) -> None:
        """Give the connections parked for longer than PARK_SECONDS back to psycopg_pool."""
        self._flush_handle = None
        parked = self._parked
        cutoff = self._loop.time() - PARK_SECONDS  # type: ignore[union-attr]
        n = 0
        while n < len(parked) and parked[n][1] <= cutoff:
            n += 1
        if n:
            old, self._parked = parked[:n], parked[n:]
            views = []
            for wrapper, _, _ in old:
                views.append(wrapper.connection)
                wrapper.connection = None
            self._give_back(views)
        if self._parked:
            delay = self._parked[0][1] + PARK_SECONDS - self._loop.time()  # type: ignore[union-attr]
            self._flush_handle = self._loop.call_later(max(delay, 0.0), self._flush)  # type: ignore[union-attr]

    def release(self, view: BridgeConnection) -> None:
        """Give a task's idle connection back from sync code (a task does the I/O)."""
        self.checked_out -= 1
        self._give_back([view])

    def _give_back(self, views: list[BridgeConnection]) -> None:
        """Return connections to psycopg_pool from sync code (a task does what must wait)."""
        run_now(self._give_back_all(views), self._loop)  # type: ignore[arg-type]

    async def _give_back_all(self, views: list[BridgeConnection]) -> None:
        for view in views:
            try:
                await self._return(view)
            except Exception:  # one failed return must not stop the others
                logger.exception("Returning a connection of alias %r failed.", self.alias)

    async def _unpark_all(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        parked, self._parked = self._parked, []
        self._spare.clear()
        for wrapper, _, _ in parked:
            view, wrapper.connection = wrapper.connection, None
            await self._return(view)

    async def aclose(self) -> None:
        """Close the pool and every connection in it."""
        self.closed = True
        await self._unpark_all()
        if self._pool is not None:
            await self._pool.close()

    # Django's postgresql backend calls these synchronously (inside a bridge).
    def open(self) -> None:
        if self._pool is not None and not self._opened:
            await_only(self.aopen())

    def getconn(self) -> BridgeConnection:
        return await_only(self.agetconn())

    def putconn(self, view: BridgeConnection) -> None:
        await_only(self.aputconn(view))

    def close(self) -> None:
        await_only(self.aclose())

    def terminate(self) -> None:
        """Close every connection now, without I/O on the loop (it is closing)."""
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for wrapper, _, _ in self._parked:
            wrapper.connection = None
        self._parked.clear()
        self._spare.clear()
        for conn in list(self._conns):
            if not conn.closed:
                conn.pgconn.finish()

    def get_stats(self) -> dict[str, Any]:
        """Return psycopg_pool's counters and settings, with ``in_use`` and ``timeouts``.

        Connections parked for the loop's next task count as available. Empty
        when unpooled (``OPTIONS["pool"] = False``).
        """
        if self._pool is None:
            return {}
        stats: dict[str, Any] = {"alias": self.alias, **self._pool.get_stats()}
        stats["pool_timeout"] = self._pool.timeout
        # psycopg_pool counts a request that timed out or was cancelled as
        # waiting until a connection comes back: count the live ones only.
        waiting = getattr(self._pool, "_waiting", None)
        stats["requests_waiting"] = (
            sum(1 for w in list(waiting) if w.conn is None and w.error is None)
            if waiting is not None
            else stats.get("requests_waiting", 0)
        )
        stats["pool_available"] = stats.get("pool_available", 0) + len(self._parked)
        stats["connections_parked"] = len(self._parked)
        stats |= {"in_use": self.checked_out, "timeouts": self.timeouts}
        return stats


def get_pool(wrapper: DatabaseWrapper) -> AsyncPool:
    """Return the pool of ``wrapper``'s alias on the running loop, making it once."""
    loop = asyncio.get_running_loop()
    per_loop = _pools.get(loop)
    if per_loop is None:
        per_loop = _pools[loop] = {}
        _on_loop_close(loop)
    pool = per_loop.get(wrapper.alias)
    if pool is None:
        pool = per_loop[wrapper.alias] = AsyncPool(wrapper)
    return pool


def reuse_wrapper(alias: str) -> DatabaseWrapper | None:
    """Return a wrapper a finished task left for ``alias`` on the running loop, or None."""
    per_loop = _pools.get(asyncio.get_running_loop())
    pool = per_loop.get(alias) if per_loop else None
    if pool is None:
        return None
    return pool.reuse_parked() or pool.reuse_spare()


def _on_loop_close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the loop's pools' connections when the loop closes or is collected.

    A loop closed with pools still open (``asyncio.run()`` of a script that
    never called ``async_connections.close_all()``, a test's loop) must not
    leave server sessions behind.
    """
    per_loop = _pools[loop]

    def terminate() -> None:
        for pool in per_loop.values():
            pool.terminate()

    weakref.finalize(loop, terminate)
    original_close = loop.close

    def close() -> None:
        _pools.pop(loop, None)
        terminate()
        original_close()

    # Loops without instance attributes (uvloop) rely on the finalizer alone.
    with contextlib.suppress(AttributeError, TypeError):
        loop.close = close  # type: ignore[method-assign]


def discard_pool(alias: str) -> AsyncPool | None:
    """Forget the running loop's pool for ``alias`` (the caller closes it)."""
    per_loop = _pools.get(asyncio.get_running_loop())
    pool = per_loop.pop(alias, None) if per_loop else None
    if pool is not None:
        pool.closed = True  # wrappers holding it must look it up again
    return pool


_closing: set[asyncio.Task[None]] = set()


def run_now(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> None:
    """Run ``coro`` from sync code on ``loop``'s thread: now, up to its first wait.

    Giving an idle connection back to psycopg_pool (no reset, no check: its
    lock is free and a waiting task is handed the connection) never waits;
    running it here saves a task per request. If it does wait, a task takes
    it over from there.
    """
    try:
        awaited = coro.send(None)
    except StopIteration:
        return
    except BaseException:
        logger.exception("Returning connections to the pool failed.")
        return
    task = loop.create_task(_resume(coro, awaited))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _resume(coro: Coroutine[Any, Any, None], awaited: Any) -> None:
    """Drive ``coro`` on from a wait it started outside any task (see :func:`run_now`)."""
    while True:
        error: BaseException | None = None
        try:
            if awaited is None:
                await asyncio.sleep(0)  # a bare yield
            else:
                # What a task does with a future its coroutine yields: clear
                # the flag the future's __await__ set, then wait for it.
                awaited._asyncio_future_blocking = False
                await awaited
        except asyncio.CancelledError as exc:
            error = exc if not awaited.cancelled() else None  # type: ignore[union-attr]
        except BaseException:  # coro reads its awaitable's outcome itself
            pass
        try:
            awaited = coro.send(None) if error is None else coro.throw(error)
        except StopIteration:
            return


def close_soon(pool: AsyncPool) -> None:
    """Close a discarded pool in a task of the running loop (from code that cannot await)."""
    task = asyncio.get_running_loop().create_task(pool.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def close_pools() -> None:
    """Close every pool of the running event loop."""
    per_loop = _pools.pop(asyncio.get_running_loop(), {})
    for pool in per_loop.values():
        await pool.aclose()


def terminate_pools(alias: str) -> None:
    """Close every connection of ``alias``'s pools on every loop, without I/O on them."""
    for per_loop in list(_pools.values()):
        pool = per_loop.pop(alias, None)
        if pool is not None:
            pool.terminate()


def pool_stats(alias: str = "default") -> dict[str, Any]:
    """Return the running loop's pool counters for ``alias`` (empty if none yet).

    Besides psycopg_pool's counters (``pool_min``, ``pool_max``, ``pool_size``,
    ``pool_available``, ``requests_num`` ...): ``alias``, ``pool_timeout``,
    ``in_use`` (connections held by tasks), ``requests_waiting`` (tasks waiting
    for one) and ``timeouts`` (checkouts that raised PoolTimeout). Example::

        stats = django_async_db.pool_stats("default")
        stats["in_use"], stats["requests_waiting"], stats["timeouts"]
    """
    per_loop = _pools.get(asyncio.get_running_loop())
    pool = per_loop.get(alias) if per_loop else None
    return pool.get_stats() if pool is not None else {}


def all_pool_stats() -> dict[str, dict[str, Any]]:
    """Return :func:`pool_stats` of every alias with a pool on the running loop.

    For monitoring: call it from async code (a metrics endpoint, a periodic
    task) of the process whose pools it reports. Example::

        for alias, stats in django_async_db.all_pool_stats().items():
            gauge("db_pool_in_use", stats["in_use"], alias=alias)
    """
    per_loop = _pools.get(asyncio.get_running_loop()) or {}
    return {alias: pool.get_stats() for alias, pool in per_loop.items()}
