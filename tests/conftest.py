"""Shared fixtures: real PostgreSQL (``DATABASE_URL``), unique test database names."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from django.db import connections

from django_async_db import _pool, async_connections


@pytest_asyncio.fixture(scope="session", loop_scope="session", autouse=True)
async def _no_sessions_left(django_db_setup: None, django_db_blocker: Any) -> AsyncIterator[None]:
    """At the end of the run, close the pools and prove no session is left open."""
    yield
    await async_connections.close_all()
    thread_local = connections._connections._thread  # this thread's sync connections
    keep = {}
    for alias in connections:
        sync = getattr(thread_local, alias, None)
        if sync is not None:
            sync.close_pool()  # Django's own (sync) pool, used by the sync test setup
            if sync.connection is not None:
                keep[alias] = sync.connection.info.backend_pid
    await asyncio.sleep(0.3)  # let the server notice the closed sockets
    for alias in connections:
        name = connections.settings[alias]["NAME"]
        if name != connections.settings[alias]["TEST"]["NAME"]:
            continue  # not set up for this run (no test used the alias)
        if bouncer := os.environ.get("DJASYNC_PGBOUNCER_ADMIN_URL"):
            # Through PgBouncer: count its clients (ours), then make it close its
            # server connections so the test database can be dropped.
            left = pgbouncer_clients(bouncer, name) - (alias in keep)
            pgbouncer_admin(bouncer, f"KILL {name}", f"RESUME {name}")
        else:
            left = sessions_on(name, exclude=keep.get(alias, 0))
        assert left == 0, f"{left} sessions left open on {alias!r}'s test database"


def pgbouncer_admin(admin_url: str, *commands: str) -> list[dict[str, Any]]:
    """Run commands on PgBouncer's admin console; return the last one's rows as dicts."""
    rows: list[dict[str, Any]] = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for command in commands:
            cur = conn.execute(command)
            names = [d.name for d in cur.description or ()]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()] if names else []
    return rows


def pgbouncer_clients(admin_url: str, dbname: str) -> int:
    """Count PgBouncer's client connections to ``dbname``."""
    return sum(1 for c in pgbouncer_admin(admin_url, "SHOW CLIENTS") if c["database"] == dbname)


def sessions_on(dbname: str, exclude: int = 0) -> int:
    """Count the server sessions connected to ``dbname`` (from a separate connection)."""
    params = connections["default"].get_connection_params()
    with psycopg.connect(
        dbname="postgres",
        **{k: params[k] for k in ("user", "password", "host", "port") if k in params},
        autocommit=True,
    ) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
            [dbname, exclude],
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def thread_probe() -> Iterator[Callable[[], set[int]]]:
    """Record the thread of every SQL statement run on any connection during the test."""
    idents: set[int] = set()
    wrappers: list[Any] = []

    def probe(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        idents.add(threading.get_ident())
        return execute(sql, params, many, context)

    from django.db.backends.base.base import BaseDatabaseWrapper

    original = BaseDatabaseWrapper.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.execute_wrappers.append(probe)
        wrappers.append(self)

    BaseDatabaseWrapper.__init__ = init  # type: ignore[method-assign]
    _pool.new_generation()  # wrappers earlier tasks left are not reused: new ones get the probe
    existing = [c for c in connections.all(initialized_only=True)]
    for conn in existing:
        conn.execute_wrappers.append(probe)
    try:
        yield lambda: set(idents)
    finally:
        BaseDatabaseWrapper.__init__ = original  # type: ignore[method-assign]
        for conn in existing + wrappers:
            if probe in conn.execute_wrappers:
                conn.execute_wrappers.remove(probe)


@pytest.fixture
def read_only_db(django_db_blocker: Any) -> Iterator[None]:
    """Allow database access to a test that writes nothing (so nothing to flush)."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture
async def db_options() -> AsyncIterator[dict[str, Any]]:
    """Change the default alias's settings (``OPTIONS`` and top level) for one test.

    Yields the alias's ``OPTIONS`` dict; everything is restored afterwards and
    the pools are rebuilt on both sides of the test.
    """
    settings_dict = connections.settings["default"]
    saved_settings, saved_options = dict(settings_dict), dict(settings_dict["OPTIONS"])
    await async_connections.close_all()
    yield settings_dict["OPTIONS"]
    settings_dict["OPTIONS"].clear()
    settings_dict["OPTIONS"].update(saved_options)
    options = settings_dict["OPTIONS"]
    settings_dict.clear()
    settings_dict.update(saved_settings)
    settings_dict["OPTIONS"] = options
    await async_connections.close_all()


@pytest.fixture
def pool_option(db_options: dict[str, Any]) -> Callable[[Any], None]:
    """Set ``OPTIONS["pool"]`` of the default alias for one test, on fresh pools."""

    def set_pool(value: Any) -> None:
        db_options["pool"] = value

    return set_pool


async def observer() -> psycopg.AsyncConnection[Any]:
    """Open a connection outside the package, to watch the server (on the ``postgres`` db)."""
    params = connections["default"].get_connection_params()
    return await psycopg.AsyncConnection.connect(
        dbname="postgres",
        **{k: params[k] for k in ("user", "password", "host", "port") if k in params},
        autocommit=True,
    )


async def wait_until(predicate: Callable[[], Any], seconds: float = 3.0) -> bool:
    """Poll ``await predicate()`` until it is true; return False after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
