"""Test cases for async code on this package, with Django's test isolation.

* :class:`AsyncioTestCase`: async test methods (and ``asyncSetUp`` /
  ``asyncTearDown``) on a real event loop in the test's own thread; no
  database (like ``SimpleTestCase``).
* :class:`AsyncioTransactionTestCase`: the same on ``TransactionTestCase``:
  real commits, tables flushed after each test.
* :class:`AsyncTestCase`: the same on ``TestCase``: each test runs in a
  transaction rolled back at the end; async code (the ORM's ``a*`` methods,
  ``run_sync``, ``async_atomic``, ``async_connections``) runs on the test's
  connection, so it sees ``setUpTestData`` rows and nested ``async_atomic``
  blocks are savepoints.

Django's own ``TestCase`` keeps working for ``async def`` tests too: while a
test runs, its connections are *pinned*, so bridge calls made on the loop
Django starts in another thread use the test's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.test import SimpleTestCase, TestCase, TransactionTestCase

from ._bridge import run_sync
from ._storage import install as install_storage

__all__ = [
    "AsyncTestCase",
    "AsyncioTestCase",
    "AsyncioTransactionTestCase",
    "install_testcase_pinning",
]

logger = logging.getLogger("django.test")


def _ours(wrapper: Any) -> bool:
    from .backends.postgresql.base import DatabaseWrapper

    return isinstance(wrapper, DatabaseWrapper)


def pin_connections(aliases: Iterator[str] | list[str]) -> None:
    """Make async code on any loop use this thread's connections for ``aliases``."""
    storage = install_storage()
    for alias in aliases:
        wrapper = connections[alias]
        if _ours(wrapper):
            storage.pin(alias, wrapper)


def unpin_connections(aliases: Iterator[str] | list[str]) -> None:
    """Undo :func:`pin_connections`."""
    storage = install_storage()
    for alias in aliases:
        storage.unpin(alias)


_pinning_installed = False


def install_testcase_pinning() -> None:
    """Pin a ``TestCase``'s connections while its test transaction is open.

    Applied to ``django.test.TestCase`` (and so to pytest-django's ``db``
    fixture) when the app is ready.
    """
    global _pinning_installed
    if _pinning_installed:
        return
    _pinning_installed = True
    enter = TestCase._enter_atomics.__func__  # type: ignore[attr-defined]
    rollback = TestCase._rollback_atomics.__func__  # type: ignore[attr-defined]

    def _enter_atomics(cls: type[TestCase]) -> dict[str, Any]:
        atomics: dict[str, Any] = enter(cls)
        pin_connections(list(atomics))
        return atomics

    def _rollback_atomics(cls: type[TestCase], atomics: dict[str, Any]) -> None:
        unpin_connections(list(atomics))
        rollback(cls, atomics)

    TestCase._enter_atomics = classmethod(_enter_atomics)  # type: ignore[assignment,method-assign]
    TestCase._rollback_atomics = classmethod(_rollback_atomics)  # type: ignore[assignment,method-assign]


class _AsyncioMixin:
    """Run ``async def`` tests on a loop in the test's thread (not Django's loop thread)."""

    _testMethodName: str

    async def asyncSetUp(self) -> None:
        """Run before each test, on the test's event loop."""

    async def asyncTearDown(self) -> None:
        """Run after each test, on the test's event loop."""

    def _setup_and_call(self, result: Any, debug: bool = False) -> None:
        method = getattr(self, self._testMethodName)
        if inspect.iscoroutinefunction(method):
            setattr(self, self._testMethodName, self._on_loop(method))
        super()._setup_and_call(result, debug)  # type: ignore[misc]

    def _on_loop(self, method: Callable[[], Coroutine[Any, Any, Any]]) -> Callable[[], None]:
        def run() -> None:
            with asyncio.Runner() as runner:
                runner.run(self._run_async(method))

        return run

    async def _run_async(self, method: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        from .connection import async_connections

        await self.asyncSetUp()
        try:
            await method()
        finally:
            try:
                await self.asyncTearDown()
            finally:
                await async_connections.close_all()


class AsyncioTestCase(_AsyncioMixin, SimpleTestCase):
    """Async tests on a real event loop in the test's thread; no database access.

    Example::

        class SlugTests(AsyncioTestCase):
            async def test_slug(self):
                self.assertEqual(await make_slug("A b"), "a-b")
    """


class AsyncioTransactionTestCase(_AsyncioMixin, TransactionTestCase):
    """Async tests with real commits; tables are flushed after each test.

    For code whose behaviour depends on commits: ``on_commit`` callbacks,
    ``durable=True`` blocks, several tasks seeing each other's writes.
    Example::

        class TransferTests(AsyncioTransactionTestCase):
            async def test_commit(self):
                async with async_atomic(durable=True):
                    await Account.objects.acreate(name="a")
                self.assertEqual(await Account.objects.acount(), 1)
    """


class AsyncTestCase(_AsyncioMixin, TestCase):
    """Async tests in a transaction rolled back after each test, like ``TestCase``.

    Async code runs on the test's connection: it sees ``setUpTestData`` rows,
    ``async_atomic`` blocks nest as savepoints, ``assertNumQueries`` counts
    bridge queries. Example::

        class BookTests(AsyncTestCase):
            @classmethod
            def setUpTestData(cls):
                cls.author = Author.objects.create(name="Ann")

            async def test_lookup(self):
                author = await Author.objects.aget(pk=self.author.pk)
                async with self.captureOnCommitCallbacks(execute=True) as callbacks:
                    async with async_atomic():
                        await async_connections["default"].on_commit(notify)
                self.assertEqual(len(callbacks), 1)
    """

    @classmethod
    def captureOnCommitCallbacks(  # type: ignore[override]
        cls, *, using: str = DEFAULT_DB_ALIAS, execute: bool = False
    ) -> _CaptureOnCommit:
        """Capture ``on_commit`` callbacks; use ``async with`` to run async ones."""
        return _CaptureOnCommit(using, execute)


class _CaptureOnCommit:
    """``captureOnCommitCallbacks`` usable with ``with`` or ``async with``."""

    def __init__(self, using: str, execute: bool) -> None:
        self.using = using
        self.execute = execute
        self.callbacks: list[Callable[[], Any]] = []

    def _sync(self) -> contextlib.AbstractContextManager[list[Callable[[], Any]]]:
        return TestCase.captureOnCommitCallbacks.__func__(  # type: ignore[attr-defined,no-any-return]
            TestCase, using=self.using, execute=self.execute
        )

    def __enter__(self) -> list[Callable[[], Any]]:
        self._cm = self._sync()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    async def __aenter__(self) -> list[Callable[[], Any]]:
        self._acm = self._acapture()
        return await self._acm.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        await self._acm.__aexit__(*exc)

    @contextlib.asynccontextmanager
    async def _acapture(self) -> AsyncIterator[list[Callable[[], Any]]]:
        cm = self._sync()
        callbacks = cm.__enter__()
        try:
            yield callbacks
        finally:
            # Django runs the callbacks in __exit__: do it through the bridge
            # so async callbacks (and their queries) work.
            await run_sync(cm.__exit__, None, None, None)
