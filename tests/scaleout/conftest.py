"""Scale-out components started by the test setup: PgBouncer, a primary and its replica.

* ``bouncer``: PgBouncer in transaction pooling mode on a free port, in front
  of the test server; alias ``"bouncer"`` reaches the default alias's test
  database through it, with ``OPTIONS["release"] = "idle"``.
* ``replication``: a throwaway primary cluster and a streaming replica made
  from it with ``pg_basebackup -R``; aliases ``"primary"`` and ``"replica"``,
  with ``testapp_author`` created on the primary (and replicated).

Both come from ``scripts/scaleout.py``, for the module that uses them (the
aliases are gone afterwards); their setup times are printed at the
end of the run. Everything is stopped and removed afterwards, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from django.db import connections

from django_async_db._pool import discard_pool, terminate_pools
from tests.testapp.models import Author

APPS = ["django_async_db", "tests.testapp"]
SETUP_TIMES: dict[str, float] = {}
BOUNCER_POOL = {"min_size": 1, "max_size": 4, "timeout": 10}


def _scaleout() -> ModuleType:
    """Import ``scripts/scaleout.py`` (it imports ``provision_pg`` next to it)."""
    name = "_djasync_scaleout"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "scripts" / "scaleout.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Report how long starting the scale-out components took."""
    if SETUP_TIMES:
        parts = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in SETUP_TIMES.items())
        terminalreporter.write_line(f"scale-out setup: {parts}")


def _server_url(settings: dict[str, Any], dbname: str = "postgres") -> str:
    user = quote(settings["USER"] or "postgres")
    password = f":{quote(settings['PASSWORD'])}" if settings["PASSWORD"] else ""
    host = settings["HOST"] or "127.0.0.1"
    return f"postgresql://{user}{password}@{host}:{settings['PORT'] or 5432}/{dbname}"


def _add_alias(alias: str, base: dict[str, Any], **changes: Any) -> None:
    settings = copy.deepcopy(base)
    settings.update(changes)
    settings["TEST"] = {**settings["TEST"], "NAME": settings["NAME"]}
    connections.settings[alias] = settings


def _drop_alias(alias: str) -> None:
    terminate_pools(alias)  # pooled connections left on other loops, without I/O
    connections.settings.pop(alias, None)


async def _close_pools(*aliases: str) -> None:
    """Close the session loop's pools of ``aliases`` (before their servers stop)."""
    for alias in aliases:
        if (pool := discard_pool(alias)) is not None:
            await pool.aclose()


@pytest.fixture(scope="module")
async def bouncer(bouncer_server: Any) -> AsyncIterator[Any]:
    """PgBouncer in front of the test server, reached through the ``"bouncer"`` alias."""
    yield bouncer_server
    await _close_pools("bouncer")


@pytest.fixture(scope="module")
async def replication(replication_servers: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A primary and its streaming replica, reached through ``"primary"``/``"replica"``."""
    yield replication_servers
    await _close_pools("primary", "replica")


@pytest.fixture(scope="module")
def bouncer_server(django_db_setup: None) -> Iterator[Any]:
    """Start PgBouncer in front of the test server; add the ``"bouncer"`` alias."""
    default = connections.settings["default"]
    start = time.monotonic()
    with _scaleout().pgbouncer(_server_url(default), as_interrupt=True) as bouncer:
        SETUP_TIMES["PgBouncer"] = time.monotonic() - start
        _add_alias(
            "bouncer",
            default,
            HOST="127.0.0.1",
            PORT=str(bouncer.port),
            OPTIONS={"pool": dict(BOUNCER_POOL), "release": "idle"},
            DISABLE_SERVER_SIDE_CURSORS=True,
        )
        try:
            yield bouncer
        finally:
            _drop_alias("bouncer")


def pgbouncer_show(bouncer: Any, what: str) -> list[dict[str, Any]]:
    """Return the rows of ``SHOW <what>`` on PgBouncer's admin console, as dicts."""
    with psycopg.connect(bouncer.admin_url, autocommit=True) as conn:
        cur = conn.execute(f"SHOW {what}")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.fixture(scope="module")
def replication_servers(django_db_setup: None, django_db_blocker: Any) -> Iterator[tuple[Any, Any]]:
    """Start a primary and its streaming replica; add ``"primary"`` and ``"replica"``."""
    default = connections.settings["default"]
    start = time.monotonic()
    with _scaleout().primary_and_replica(as_interrupt=True) as (primary, replica):
        for alias, cluster in (("primary", primary), ("replica", replica)):
            _add_alias(
                alias,
                default,
                NAME="postgres",
                USER="postgres",
                PASSWORD="",
                HOST="127.0.0.1",
                PORT=str(cluster.port),
                OPTIONS={"pool": {"min_size": 1, "max_size": 10, "timeout": 10}},
            )
        try:
            with django_db_blocker.unblock():
                with connections["primary"].schema_editor() as editor:
                    editor.create_model(Author)
                connections["primary"].close()
            with psycopg.connect(replica.url, autocommit=True) as conn:
                deadline = time.monotonic() + 30
                while conn.execute("SELECT to_regclass('testapp_author')").fetchone() == (None,):
                    assert time.monotonic() < deadline, "the replica never received the table"
                    time.sleep(0.05)
            SETUP_TIMES["primary + streaming replica"] = time.monotonic() - start
            yield primary, replica
        finally:
            for alias in ("primary", "replica"):
                _drop_alias(alias)
