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

A wrapper can also be *pinned* for an alias (test support: async tests must
use the test case's connection and transaction, whichever loop runs them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from asyncio import current_task
from typing import Any

from django.db import connections

from . import _bridge
from ._pool import reuse_wrapper

logger = logging.getLogger("django_async_db")

__all__ = ["TaskLocal", "install", "task_wrappers"]


class _Namespace:
    __slots__ = ("__dict__", "__weakref__")


class TaskLocal:
    """Connection storage keyed by asyncio task, thread-local outside a loop."""

    def __init__(self) -> None:
        object.__setattr__(self, "_thread", threading.local())
        # Plain dict: entries leave in the task's done-callback (faster than
        # a WeakKeyDictionary, which builds a weakref on every lookup).
        object.__setattr__(self, "_tasks", {})
        object.__setattr__(self, "_pins", {})

    def _namespace(self, create: bool) -> tuple[Any, bool]:
        """Return (namespace, owned by a task) for the caller."""
        try:
            task = current_task()
        except RuntimeError:  # no running loop
            return self._thread, False
        if task is None:
            return self._thread, False
        tasks: dict[asyncio.Task[Any], _Namespace] = self._tasks
        ns = tasks.get(task)
        if ns is None:
            ns = _Namespace()
            if create:
                tasks[task] = ns
                task.add_done_callback(self._task_done)
        return ns, True

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        ns = self._tasks.pop(task, None)
        if ns is None:
            return
        # Clean wrappers stay on the loop for its next tasks (see
        # DatabaseWrapper.end_of_task); the others are released in a task.
        left = [
            wrapper
            for wrapper in vars(ns).values()
            if not (getattr(wrapper, "end_of_task", None) and wrapper.end_of_task())
            and wrapper.connection is not None
        ]
        if left:
            release = task.get_loop().create_task(_release(left))
            _releases.add(release)
            release.add_done_callback(_releases.discard)

    def share(self, child: asyncio.Task[Any], parent: asyncio.Task[Any] | None) -> None:
        """Make ``child`` use ``parent``'s connections while it runs.

        For a task the parent awaits and does nothing meanwhile (a shielded
        await): the connections stay the parent's, released when it ends.
        """
        if parent is None:
            return
        ns = self._tasks.get(parent)
        if ns is None:
            ns = self._tasks[parent] = _Namespace()
            parent.add_done_callback(self._task_done)
        self._tasks[child] = ns
        child.add_done_callback(self._unshare)

    def _unshare(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)

    def lookup(self, name: str) -> Any:
        """Return the caller's wrapper for ``name`` (or the pinned one), else None.

        ``connections[alias]``'s fast path: one call instead of a failed
        attribute lookup, ``__getattr__`` and :meth:`_namespace`.
        """
        try:
            task = current_task()
        except RuntimeError:  # no running loop
            task = None
        if task is None:
            return getattr(self._thread, name, None)
        ns = self._tasks.get(task)
        if ns is not None and (wrapper := ns.__dict__.get(name)) is not None:
            return wrapper
        return self._pins.get(name)

    def __getattr__(self, name: str) -> Any:
        wrapper = self.lookup(name)
        if wrapper is None:
            raise AttributeError(name)
        return wrapper

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._namespace(create=True)[0], name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._namespace(create=True)[0], name)

    def pin(self, alias: str, wrapper: Any) -> None:
        """Make every task, on any loop, use ``wrapper`` for ``alias`` until unpinned.

        Test support: async tests must run on the test case's connection (and
        its transaction). The wrapper is marked as shared between threads.
        """
        self.unpin(alias)
        wrapper.inc_thread_sharing()
        self._pins[alias] = wrapper

    def unpin(self, alias: str | None = None) -> None:
        """Undo :meth:`pin` for ``alias`` (every alias when None)."""
        for name in list(self._pins) if alias is None else [alias]:
            wrapper = self._pins.pop(name, None)
            if wrapper is not None:
                wrapper.dec_thread_sharing()

    def pinned(self, alias: str) -> Any:
        """Return the wrapper pinned for ``alias``, or None."""
        return self._pins.get(alias)


_releases: set[asyncio.Task[None]] = set()


async def release_idle() -> None:
    """Give back this task's idle connections on aliases with ``OPTIONS["release"] = "idle"``.

    Idle: connected, outside any atomic block. Awaited after each outermost
    bridge call, so a connection is held only for one call or one transaction
    (what PgBouncer's transaction pooling needs).
    """
    storage = connections._connections  # type: ignore[attr-defined]
    if not isinstance(storage, TaskLocal):
        return
    ns, in_task = storage._namespace(create=False)
    if not in_task:
        return
    for wrapper in list(vars(ns).values()):
        if (
            getattr(wrapper, "release_idle", False)
            and wrapper.connection is not None
            and not wrapper.in_atomic_block
        ):
            try:
                await _bridge.run_sync_shielded(wrapper.close)
            except Exception:  # the call's own outcome matters more than the release's
                logger.exception("Releasing the connection of alias %r failed.", wrapper.alias)


async def _release(wrappers: list[Any]) -> None:
    from ._bridge import run_sync_shielded

    for wrapper in wrappers:
        if wrapper.connection is None:
            continue
        try:
            view = wrapper.detach_idle_connection()
            if view is not None:  # nothing to run on it: straight back to the pool
                await view._pool.aputconn(view)
            else:
                await run_sync_shielded(wrapper.close)
        except Exception:  # a failed release must not stop the others
            logger.exception("Releasing the connection of alias %r failed.", wrapper.alias)


def task_wrappers() -> dict[str, Any]:
    """Return the current task's initialized wrappers by alias."""
    storage = connections._connections  # type: ignore[attr-defined]
    if isinstance(storage, TaskLocal):
        return dict(vars(storage._namespace(create=False)[0]))
    return {}


def install() -> TaskLocal:
    """Put a :class:`TaskLocal` behind ``django.db.connections`` (once)."""
    storage = connections._connections  # type: ignore[attr-defined]
    if not isinstance(storage, TaskLocal):
        new = TaskLocal()
        # Keep what this thread already opened (sync code before install).
        for alias in connections:
            try:
                wrapper = getattr(storage, alias)
            except AttributeError:
                continue
            setattr(new._thread, alias, wrapper)
        connections._connections = new  # type: ignore[attr-defined]
        storage = new
        _bridge.share_connections = new.share
        create = connections.create_connection

        def create_connection(alias: str) -> Any:
            """Make a task's wrapper for ``alias``, or take one an earlier task left."""
            try:
                in_task = current_task() is not None
            except RuntimeError:  # no running loop
                in_task = False
            if in_task and (wrapper := reuse_wrapper(alias)) is not None:
                return wrapper
            return create(alias)

        connections.create_connection = create_connection  # type: ignore[method-assign]
        handler = type(connections)
        if "__getitem__" not in handler.__dict__ or not getattr(
            handler.__getitem__, "_task_local", False
        ):
            django_getitem = handler.__getitem__

            def __getitem__(self: Any, alias: str) -> Any:
                # Django's lookup, with TaskLocal.lookup() first for the common case.
                storage = self._connections
                if type(storage) is TaskLocal and (wrapper := storage.lookup(alias)) is not None:
                    return wrapper
                return django_getitem(self, alias)

            __getitem__._task_local = True  # type: ignore[attr-defined]
            handler.__getitem__ = __getitem__  # type: ignore[method-assign]
    return storage
