"""``async_connections``: the current task's database connections, awaitable.

The facade keeps no state of its own: every call goes through the bridge to
the task's Django ``DatabaseWrapper`` (``django.db.connections[alias]``), so
raw SQL here shares the connection and transaction of the ORM calls made by
the same task.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, cast

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, ProgrammingError, connections

from ._bridge import await_only, run_sync, run_sync_shielded
from ._pool import close_pools
from ._storage import task_wrappers
from .backends.postgresql.base import DatabaseWrapper

__all__ = ["AsyncConnection", "AsyncConnectionHandler", "AsyncCursor", "async_connections"]

ENGINE = "django_async_db.backends.postgresql"


def get_wrapper(alias: str | None) -> DatabaseWrapper:
    """Return the current task's wrapper for ``alias``, checking it is on our ENGINE."""
    alias = alias or DEFAULT_DB_ALIAS
    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):
        engine = connections.settings[alias]["ENGINE"]
        raise ImproperlyConfigured(
            f"Database alias {alias!r} uses ENGINE {engine!r}; async connections and "
            f"async_atomic need ENGINE {ENGINE!r}."
        )
    return wrapper


def sync_callback(func: Callable[[], Any]) -> Callable[[], Any]:
    """Adapt a sync or async callable so Django can call it from the bridge."""
    if not inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func, updated=())
    def call() -> Any:
        return await_only(func())

    return call


class AsyncCursor:
    """An async cursor on the task's connection (a Django ``CursorWrapper`` inside).

    Example::

        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT id, title FROM book WHERE id = %s", [1])
            row = await cur.fetchone()
    """

    def __init__(self, wrapper: DatabaseWrapper) -> None:
        self._wrapper = wrapper
        self._cursor: Any = None

    async def __aenter__(self) -> AsyncCursor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _run(self, method: str, *args: Any) -> None:
        cursor = self._cursor
        if cursor is None or cursor.cursor.connection is not self._wrapper.connection:
            # First use, or the connection went back to the pool since the last
            # statement (OPTIONS["release"] = "idle"): use the current one.
            cursor = self._cursor = self._wrapper.cursor()
        getattr(cursor, method)(*args)

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        """Execute one statement; parameters are passed separately, never formatted in."""
        await run_sync(self._run, "execute", sql, params)

    async def executemany(self, sql: str, param_list: Sequence[Any]) -> None:
        """Execute ``sql`` once for each parameter set."""
        await run_sync(self._run, "executemany", sql, param_list)

    # Client-side cursors hold the whole result: fetching does no I/O.
    async def fetchone(self) -> tuple[Any, ...] | None:
        """Return the next row, or None when the result is exhausted."""
        return self._fetched().fetchone()  # type: ignore[no-any-return]

    async def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        """Return up to ``size`` rows (the cursor's ``arraysize`` by default)."""
        cursor = self._fetched()
        return cursor.fetchmany(size) if size is not None else cursor.fetchmany()  # type: ignore[no-any-return]

    async def fetchall(self) -> list[tuple[Any, ...]]:
        """Return every remaining row."""
        return self._fetched().fetchall()  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[tuple[Any, ...]]:
        return self._rows()

    async def _rows(self) -> AsyncIterator[tuple[Any, ...]]:
        cursor = self._fetched()
        while (row := cursor.fetchone()) is not None:
            yield row

    def _fetched(self) -> Any:
        if self._cursor is None:
            raise ProgrammingError("Call `await cursor.execute(...)` before fetching rows.")
        return self._cursor

    @property
    def rowcount(self) -> int:
        """Return the rows produced or affected by the last statement (-1 if unknown)."""
        return self._cursor.rowcount if self._cursor is not None else -1

    @property
    def description(self) -> Any:
        """Return the result's column descriptions (None before a query)."""
        return self._cursor.description if self._cursor is not None else None

    async def close(self) -> None:
        """Close the cursor (the connection stays open)."""
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None


class AsyncConnection:
    """The current task's connection for one alias, with async methods.

    Example::

        conn = async_connections["default"]
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
        await conn.on_commit(send_email)
    """

    def __init__(self, wrapper: DatabaseWrapper) -> None:
        self._wrapper = wrapper

    @property
    def alias(self) -> str:
        """Return the database alias."""
        return self._wrapper.alias  # type: ignore[no-any-return]

    @property
    def wrapper(self) -> DatabaseWrapper:
        """Return Django's ``DatabaseWrapper`` behind this connection."""
        return self._wrapper

    @property
    def in_atomic_block(self) -> bool:
        """Return True inside ``async_atomic()`` / ``atomic()``."""
        return self._wrapper.in_atomic_block  # type: ignore[no-any-return]

    def get_autocommit(self) -> bool:
        """Return the autocommit state (no I/O)."""
        return self._wrapper.autocommit  # type: ignore[no-any-return]

    def get_rollback(self) -> bool:
        """Return True if the innermost atomic block is marked for rollback."""
        return self._wrapper.get_rollback()  # type: ignore[no-any-return]

    def set_rollback(self, rollback: bool) -> None:
        """Mark (or unmark) the innermost atomic block for rollback, like Django's."""
        self._wrapper.set_rollback(rollback)

    def cursor(self) -> AsyncCursor:
        """Return a new :class:`AsyncCursor` (use ``async with``)."""
        return AsyncCursor(self._wrapper)

    async def ensure_connection(self) -> None:
        """Check a connection out of the pool now (normally done on first query)."""
        await run_sync(self._wrapper.ensure_connection)

    async def on_commit(
        self, func: Callable[[], Any | Awaitable[Any]], robust: bool = False
    ) -> None:
        """Register ``func`` (sync or async) to run after the transaction commits.

        Outside a transaction it runs at once, like Django's ``on_commit``.
        """
        await run_sync(self._wrapper.on_commit, sync_callback(func), robust)

    aon_commit = on_commit

    async def close(self) -> None:
        """Give the connection back to the pool (closing it when unpooled)."""
        await run_sync_shielded(self._wrapper.close)

    aclose = close


class AsyncConnectionHandler:
    """Give each asyncio task its own connection per alias.

    ``async_connections[alias]`` is the calling task's connection (a child
    task never shares its parent's). Example::

        from django_async_db import async_connections

        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT now()")
    """

    def __getitem__(self, alias: str) -> AsyncConnection:
        return AsyncConnection(get_wrapper(alias))

    def __iter__(self) -> Iterator[str]:
        return (a for a, s in connections.settings.items() if s["ENGINE"] == ENGINE)

    @asynccontextmanager
    async def independent_connection(
        self, alias: str = DEFAULT_DB_ALIAS
    ) -> AsyncIterator[AsyncConnection]:
        """Use a fresh connection for ``alias`` in this block, outside any open transaction.

        Inside the block this task's ORM calls and ``async_connections[alias]``
        use the new connection; it is released at the end and the previous one
        is restored. Example::

            async with async_atomic():
                ...
                async with async_connections.independent_connection():
                    await AuditLog.objects.acreate(...)   # commits on its own
        """
        previous = get_wrapper(alias)
        wrapper = connections.create_connection(alias)
        connections[alias] = wrapper
        try:
            yield AsyncConnection(cast(DatabaseWrapper, wrapper))
        finally:
            connections[alias] = previous
            await run_sync_shielded(wrapper.close)

    async def close_all(self) -> None:
        """Release this task's connections and close every pool of this event loop.

        Call it when the application shuts down (ASGI lifespan) or at the end
        of a script, before the loop closes.
        """
        for wrapper in task_wrappers().values():
            if isinstance(wrapper, DatabaseWrapper) and wrapper.is_async:
                await run_sync_shielded(wrapper.close)
        await close_pools()


async_connections = AsyncConnectionHandler()
