"""Task-owned connections: the storage behind ``django.db.connections``.

Django keeps its connections in an asgiref ``Local(thread_critical=True)``. In
a thread with a running loop that storage is context-variable backed and the
dict inside it is shared by every task created from a context that already
holds it: after the parent touched the ORM once, ``gather()``-ed children
share its connection and transaction. :class:`TaskLocal` replaces it:

* with a running loop and a current task, each task has its own namespace
  (a child task never sees its parent's connection); when the task ends its
  connections are given back to the pool;
* otherwise (threads, sync code) it is a plain thread-local, exactly Django's
  behaviour.

A thread's loop can also *pin* a wrapper for an alias (test support: async
tests must use the test case's connection and transaction).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

from django.db import connections

logger = logging.getLogger("django_async_db")

__all__ = ["TaskLocal", "install", "task_wrappers"]


class _Namespace:
    __slots__ = ("__dict__", "__weakref__")


class TaskLocal:
    """Connection storage keyed by asyncio task, thread-local outside a loop."""

    def __init__(self) -> None:
        object.__setattr__(self, "_thread", threading.local())
        object.__setattr__(self, "_tasks", weakref.WeakKeyDictionary())
        object.__setattr__(self, "_pins", {})

    def _namespace(self, create: bool) -> Any:
        task = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        else:
            task = asyncio.current_task(loop)
        if task is None:
            return self._thread
        tasks: weakref.WeakKeyDictionary[asyncio.Task[Any], _Namespace] = self._tasks
        ns = tasks.get(task)
        if ns is None:
            ns = _Namespace()
            pins = self._pins.get(loop)
            if pins:
                ns.__dict__.update(pins)
            if not create:
                return ns
            tasks[task] = ns
            task.add_done_callback(self._task_done)
        return ns

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        ns = self._tasks.pop(task, None)
        if ns is None:
            return
        pinned = self._pins.get(task.get_loop(), {})
        owned = [w for a, w in vars(ns).items() if pinned.get(a) is not w]
        if any(w.connection is not None for w in owned):
            release = task.get_loop().create_task(_release(owned))
            _releases.add(release)
            release.add_done_callback(_releases.discard)

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._namespace(create=False), name)
        except AttributeError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._namespace(create=True), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._namespace(create=True), name)

    def pin(self, loop: asyncio.AbstractEventLoop, alias: str, wrapper: Any) -> None:
        """Make every task of ``loop`` use ``wrapper`` for ``alias``."""
        self._pins.setdefault(loop, {})[alias] = wrapper

    def unpin(self, loop: asyncio.AbstractEventLoop, alias: str | None = None) -> None:
        """Undo :meth:`pin` for ``alias`` (every alias when None)."""
        if alias is None:
            self._pins.pop(loop, None)
        else:
            self._pins.get(loop, {}).pop(alias, None)


_releases: set[asyncio.Task[None]] = set()


async def _release(wrappers: list[Any]) -> None:
    from ._bridge import run_sync_shielded

    for wrapper in wrappers:
        if wrapper.connection is None:
            continue
        try:
            await run_sync_shielded(wrapper.close)
        except Exception:  # noqa: BLE001 - a failed release must not stop the others
            logger.exception("Releasing the connection of alias %r failed.", wrapper.alias)


def task_wrappers() -> dict[str, Any]:
    """Return the current task's initialized wrappers by alias."""
    storage = connections._connections
    if isinstance(storage, TaskLocal):
        return dict(vars(storage._namespace(create=False)))
    return {}


def install() -> TaskLocal:
    """Put a :class:`TaskLocal` behind ``django.db.connections`` (once)."""
    storage = connections._connections
    if not isinstance(storage, TaskLocal):
        new = TaskLocal()
        # Keep what this thread already opened (sync code before install).
        for alias in connections:
            try:
                wrapper = getattr(storage, alias)
            except AttributeError:
                continue
            setattr(new._thread, alias, wrapper)
        connections._connections = new
        storage = new
    return storage
