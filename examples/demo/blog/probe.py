"""A thread-ident probe for a served demo (``DEMO_THREAD_PROBE=1``).

Counts, in the server process, every hop from the event loop to a thread
(each ``loop.run_in_executor()``: asgiref's ``sync_to_async`` and
``asyncio.to_thread`` both go through it) and every SQL statement, with the
thread it ran in. ``GET /bench/probe/`` returns the counts.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

from django.db.backends.signals import connection_created

_hops: Counter[str] = Counter()
_statements = {"on_loop": 0, "off_loop": 0}
_requests = {"count": 0}
_loop_thread: int | None = None


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Start counting on ``loop`` (called at ASGI lifespan startup)."""
    global _loop_thread
    _loop_thread = threading.get_ident()
    original = loop.run_in_executor

    def run_in_executor(executor: Any, func: Any, *args: Any) -> Any:
        target = getattr(func, "func", func)  # asgiref hands over functools.partial(...)
        _hops[getattr(target, "__qualname__", type(target).__name__)] += 1
        return original(executor, func, *args)

    loop.run_in_executor = run_in_executor  # type: ignore[method-assign]
    connection_created.connect(_watch_statements, dispatch_uid="blog.probe")


def _watch_statements(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _record not in connection.execute_wrappers:
        connection.execute_wrappers.append(_record)


def _record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    key = "on_loop" if threading.get_ident() == _loop_thread else "off_loop"
    _statements[key] += 1
    return execute(sql, params, many, context)


def count_request() -> None:
    """Count one served request (the ASGI application calls it)."""
    _requests["count"] += 1


def snapshot(*, reset: bool = False) -> dict[str, Any]:
    """Return the counts so far (the probe request itself included)."""
    data = {
        "installed": _loop_thread is not None,
        "requests": _requests["count"],
        "thread_hops": sum(_hops.values()),
        "hops_by_function": dict(_hops.most_common()),
        "statements_on_loop": _statements["on_loop"],
        "statements_off_loop": _statements["off_loop"],
    }
    if reset:
        _hops.clear()
        _statements.update(on_loop=0, off_loop=0)
        _requests["count"] = 0
    return data
