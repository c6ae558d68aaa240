"""PostgreSQL database backend for Django whose I/O is async inside a bridge.

Outside an event loop this *is* Django's postgresql backend (migrations,
management commands, admin, WSGI, the test runner's database creation). In a
thread with a running loop, a wrapper belongs to one asyncio task and gets
its connection from the alias's async pool on that loop; its queries run
through :func:`~django_async_db.run_sync`, where every wait is an await.
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base import base as django_base
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as pg_base
from django.db.backends.signals import connection_created
from psycopg import pq

from ... import _bridge
from ..._bridge import in_bridge, install_async_unsafe_hook
from ..._pool import AsyncPool, close_soon, discard_pool, get_pool
from ..._storage import install, release_idle
from ._psycopg import BridgeConnection
from .creation import DatabaseCreation

__all__ = ["DatabaseWrapper"]


class _PsycopgModule(types.ModuleType):
    """psycopg as Django sees it, except that ``connect`` makes bridge connections."""

    connect = staticmethod(BridgeConnection.connect)

    def __getattr__(self, name: str) -> Any:
        return getattr(psycopg, name)


_Database = _PsycopgModule("psycopg")
setattr(_Database, "__version__", psycopg.__version__)  # noqa: B010 - a module attribute


class DatabaseWrapper(pg_base.DatabaseWrapper):  # type: ignore[misc]
    """Django's postgresql ``DatabaseWrapper``, async underneath inside a bridge."""

    Database = _Database
    creation_class = DatabaseCreation

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        # A WITH HOLD cursor was declared on the current connection (see _close).
        self._held_cursors = False
        self._async_pool: AsyncPool | None = None
        release = self.settings_dict["OPTIONS"].get("release", "task")
        if release not in ("task", "idle"):
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['release'] must be 'task' or 'idle', "
                f"not {release!r}."
            )
        if release == "idle" and not self.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['release'] = 'idle' gives connections "
                f"back between queries, which closes server-side cursors: also set "
                f"DATABASES[{self.alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True."
            )
        cache = self.settings_dict["OPTIONS"].get("compiled_sql_cache", True)
        if not isinstance(cache, bool):
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['compiled_sql_cache'] must be True or "
                f"False, not {cache!r}."
            )
        #: Give the connection back after each bridge call outside a transaction
        #: (``OPTIONS["release"] = "idle"``) instead of when the task ends.
        self.release_idle = release == "idle" and self._loop is not None
        if self.release_idle:
            _bridge.after_outermost_call = release_idle
        # Django's connect() ran once on this wrapper (see aconnect()).
        self._connected_once = False
        # Settings that let aconnect() do what connect() does (see aconnect()).
        self._plain_checkout = (
            self._loop is not None
            and self.alias != NO_DB_ALIAS
            and self.settings_dict["AUTOCOMMIT"]
            and "isolation_level" not in self.settings_dict["OPTIONS"]
        )

    def connect(self) -> None:
        super().connect()
        self._connected_once = True

    async def aconnect(self) -> bool:
        """Do Django's ``connect()`` from plain async code when nothing in it needs a bridge.

        For a task-owned wrapper that connected before (a wrapper a finished
        task left): with the settings it had then, Django's ``connect()`` on a
        pooled connection resets the wrapper's state, takes a connection from
        the pool, turns autocommit on (a pooled connection is idle, so it is no
        query), and sends ``connection_created``. This does those steps, with
        the pool awaited, unless something among them could run a query or
        user code: ``connection_created`` receivers, ``OPTIONS["isolation_level"]``,
        ``AUTOCOMMIT = False``, the database version check not yet done, an
        open atomic block. Returns False then; the caller uses ``connect()``
        in a bridge. A test fingerprints the Django methods this follows.
        Example (what the compiled SQL cache's hits do)::

            from django.db import connections
            from django_async_db import run_sync

            wrapper = connections["default"]
            if wrapper.connection is None and not await wrapper.aconnect():
                await run_sync(wrapper.ensure_connection)
        """
        if (
            not self._connected_once
            or not self._plain_checkout
            or self.in_atomic_block
            or self.run_commit_hooks_on_set_autocommit_on
            or connection_created.receivers
            or self.alias not in django_base.RAN_DB_VERSION_CHECK
        ):
            return False
        pool = self.pool
        if pool._pool is None:  # unpooled: connect() opens a connection itself
            return False
        self.check_settings()
        self.in_atomic_block = False
        self.savepoint_ids = []
        self.atomic_blocks = []
        self.needs_rollback = False
        self.health_check_enabled = self.settings_dict["CONN_HEALTH_CHECKS"]
        max_age = self.settings_dict["CONN_MAX_AGE"]
        self.close_at = None if max_age is None else time.monotonic() + max_age
        self.closed_in_transaction = False
        self.errors_occurred = False
        self.health_check_done = True
        # get_new_connection() without OPTIONS["isolation_level"]:
        self.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        with self.wrap_database_errors:
            if not pool._opened:
                await pool.aopen()
            view = await pool.agetconn()
            self.connection = view
            # set_autocommit(True): the connection is idle, so no query.
            if not view.autocommit:
                view.autocommit = True
        self.autocommit = True
        self.run_on_commit = []
        return True

    def get_connection_params(self) -> dict[str, Any]:
        params: dict[str, Any] = super().get_connection_params()
        params.pop("release", None)  # ours, not libpq parameters
        params.pop("compiled_sql_cache", None)
        return params

    @property
    def is_async(self) -> bool:
        """Return True for a wrapper owned by an asyncio task (pooled per loop)."""
        return self._loop is not None

    @property
    def pool(self) -> Any:
        if self._loop is not None and self.alias != NO_DB_ALIAS:
            # Django reads it several times per checkout: keep the loop's pool.
            pool = self._async_pool
            if pool is None or pool.closed:
                pool = self._async_pool = get_pool(self)
            return pool
        pool = super().pool
        if pool is not None:
            # Django's sync pool makes plain psycopg connections; a sync wrapper
            # used from a bridge (a pinned test connection) must wait on the loop.
            pool.connection_class = BridgeConnection
        return pool

    @property
    def async_pool(self) -> AsyncPool:
        """Return the async pool this task-owned wrapper draws connections from."""
        return get_pool(self)

    def close_pool(self) -> None:
        if self._loop is None:
            super().close_pool()
        elif (pool := discard_pool(self.alias)) is not None:
            if in_bridge():
                pool.close()
            else:
                # Plain async code, e.g. Django's setting_changed receivers
                # (ensure_timezone): it cannot await, but the discarded pool's
                # connections must still be closed.
                close_soon(pool)

    def create_cursor(self, name: str | None = None) -> Any:
        cursor = super().create_cursor(name)
        if name and self.connection.autocommit:
            # DECLARE ... WITH HOLD outlives its transaction: _close() closes it.
            self._held_cursors = True
        return cursor

    def _close(self) -> None:
        conn = self.connection
        try:
            if conn is not None and in_bridge():
                # Another greenlet may still use the connection (the loop's
                # finalizer closing an abandoned aiterator()'s cursor): let it finish.
                with conn.lock:
                    pass
                if self._held_cursors:
                    # A held cursor would outlive this checkout: the next task
                    # would inherit it (and could collide with its name).
                    self._held_cursors = False
                    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                        conn.rollback()
                    conn.execute("CLOSE ALL")
        finally:
            super()._close()  # type: ignore[misc]

    def detach_idle_connection(self) -> BridgeConnection | None:
        """Take the connection off a finished task's wrapper if giving it back needs no query.

        The cheap path of the end-of-task release: outside any atomic block,
        with no held cursor and nobody on the connection, Django's ``close()``
        would only hand it to the pool, which the caller now does directly.
        Returns None when the full ``close()`` (in a bridge) is needed.
        """
        conn = self.connection
        if (
            conn is None
            or self._loop is None
            or self.in_atomic_block
            or self._held_cursors
            or conn.lock.locked()
            or not isinstance(conn, BridgeConnection)
        ):
            return None
        self.connection = None
        self.run_on_commit = []
        return conn

    def end_of_task(self) -> bool:
        """Leave this finished task's wrapper to the loop's next task if it is clean.

        Clean: outside any transaction, in autocommit, with no pending
        ``on_commit`` callback, execute wrapper, held cursor, error or other
        user, and its connection (if any) idle. The wrapper then keeps its
        connection for the next task (or, with tasks waiting for connections,
        is kept without it). Returns False when the caller must release it.
        """
        conn = self.connection
        if (
            self._loop is None
            or self.in_atomic_block
            or self.needs_rollback
            or self.run_on_commit
            or self.execute_wrappers
            or self._held_cursors
            or self.errors_occurred
            or self.allow_thread_sharing
            or self.release_idle
            or self.alias == NO_DB_ALIAS
        ):
            return False
        pool = self._async_pool
        if pool is None or pool.closed:
            return conn is None
        if conn is None:
            pool.spare(self)
            return True
        if (
            type(conn) is not BridgeConnection
            or not self.autocommit
            or conn.lock.locked()
            or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE
        ):
            return False
        if pool.park(self):
            return True
        view = self.detach_idle_connection()
        if view is None:
            return False
        pool.spare(self)
        pool.release(view)
        return True

    def close_if_unusable(self) -> None:
        """Do Django's ``close_if_unusable_or_obsolete()`` except closing an old connection.

        For a task-owned wrapper at the end of a request: the connection's
        lifetime is the task's (and the pool's ``max_lifetime``), not
        ``CONN_MAX_AGE``.
        """
        close_at, self.close_at = self.close_at, None
        try:
            self.close_if_unusable_or_obsolete()
        finally:
            self.close_at = close_at

    def reuse(self) -> None:
        """Reset what a new wrapper would not carry over (a task takes this one).

        A parked wrapper's connection is never health-checked again here:
        parking is off when ``CONN_HEALTH_CHECKS`` (or a pool ``check``) is set.
        """
        self.queries_log.clear()


install_async_unsafe_hook(DatabaseWrapper)
