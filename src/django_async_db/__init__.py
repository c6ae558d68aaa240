"""django-async-db: Django's ORM with real async I/O on PostgreSQL (psycopg 3).

Example::

    from django_async_db import async_atomic, async_connections, run_sync

    async with async_atomic():
        async with async_connections["default"].cursor() as cur:
            await cur.execute("UPDATE account SET balance = balance - %s WHERE id = %s", [5, 1])
        author = await run_sync(lambda: book.author)
"""

from __future__ import annotations

from ._bridge import await_only, in_bridge, run_sync
from ._fastpath import clear_compiled_sql_cache, compiled_sql_cache_info
from ._pool import all_pool_stats, pool_stats
from .connection import AsyncConnection, AsyncCursor, async_connections
from .exceptions import PoolTimeout
from .transaction import AsyncAtomic, async_atomic

__all__ = [
    "AsyncAtomic",
    "AsyncConnection",
    "AsyncCursor",
    "PoolTimeout",
    "all_pool_stats",
    "async_atomic",
    "async_connections",
    "await_only",
    "clear_compiled_sql_cache",
    "compiled_sql_cache_info",
    "in_bridge",
    "pool_stats",
    "run_sync",
]

__version__ = "0.1.0.dev0"
